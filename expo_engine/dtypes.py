"""Safetensors dtype names, their torch dtypes and the order safetensors lays them out in a file."""

import torch

# In the order of safetensors' own `Dtype` enum: `safetensors.torch.save_file` sorts a file's tensors by this
# order, descending, then by name. The writer follows it so that its shards are byte-identical to save_file's.
_ORDER = [
    ("BOOL", torch.bool),
    ("U8", torch.uint8),
    ("I8", torch.int8),
    ("F8_E5M2", torch.float8_e5m2),
    ("F8_E4M3", torch.float8_e4m3fn),
    ("I16", torch.int16),
    ("U16", torch.uint16),
    ("F16", torch.float16),
    ("BF16", torch.bfloat16),
    ("I32", torch.int32),
    ("U32", torch.uint32),
    ("F32", torch.float32),
    ("C64", torch.complex64),
    ("F64", torch.float64),
    ("I64", torch.int64),
    ("U64", torch.uint64),
]

TORCH = dict(_ORDER)
RANK = {name: i for i, (name, _) in enumerate(_ORDER)}
NAME = {dtype: name for name, dtype in _ORDER}

# The dtypes ExPO extrapolates. Anything else is copied, and only when both sides hold the same bytes.
FLOATS = frozenset({"F16", "BF16", "F32", "F64"})

# What `--dtype` accepts, and the value config.json's `torch_dtype` gets for each.
CLI_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def itemsize(name: str) -> int:
    return TORCH[name].itemsize
