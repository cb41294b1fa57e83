"""Safetensors dtype names, their sizes, their torch dtypes and the order safetensors lays them out in a file.

Names and sizes need no torch: the engine plans, reads, computes (compiled kernel) and writes safetensors without
importing it (~3 s of CPU here). `TORCH` and `NAME` import torch when first used.
"""

# In the order of safetensors' own `Dtype` enum: `safetensors.torch.save_file` sorts a file's tensors by this
# order, descending, then by name. The writer follows it so that its shards are byte-identical to save_file's.
_ORDER = [
    ("BOOL", 1, "bool"),
    ("U8", 1, "uint8"),
    ("I8", 1, "int8"),
    ("F8_E5M2", 1, "float8_e5m2"),
    ("F8_E4M3", 1, "float8_e4m3fn"),
    ("I16", 2, "int16"),
    ("U16", 2, "uint16"),
    ("F16", 2, "float16"),
    ("BF16", 2, "bfloat16"),
    ("I32", 4, "int32"),
    ("U32", 4, "uint32"),
    ("F32", 4, "float32"),
    ("C64", 8, "complex64"),
    ("F64", 8, "float64"),
    ("I64", 8, "int64"),
    ("U64", 8, "uint64"),
]

ITEMSIZE = {name: size for name, size, _ in _ORDER}
RANK = {name: i for i, (name, _, _) in enumerate(_ORDER)}

# The dtypes ExPO extrapolates. Anything else is copied, and only when both sides hold the same bytes.
FLOATS = frozenset({"F16", "BF16", "F32", "F64"})

# What `--dtype` accepts, and the value config.json's `torch_dtype` gets for each.
CLI_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def itemsize(name: str) -> int:
    return ITEMSIZE[name]


def __getattr__(attr: str):
    """TORCH (name -> torch dtype) and NAME (torch dtype -> name), built on first use."""
    if attr in ("TORCH", "NAME"):
        import torch

        torch_dtypes = {name: getattr(torch, attr_name) for name, _, attr_name in _ORDER}
        globals()["TORCH"] = torch_dtypes
        globals()["NAME"] = {v: k for k, v in torch_dtypes.items()}
        return globals()[attr]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
