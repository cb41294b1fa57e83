"""Peak resident memory (VmHWM) of a real `expo extrapolate` process does not grow with the largest tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

CHUNK_MB = 4
CHILD = """
import json, sys
from expo_engine.cli import main

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

base = hwm()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "base": base, "peak": hwm()}))
"""


def _pair(root, big_mb: int) -> tuple[str, str]:
    """A pair whose largest tensor (an embedding) is `big_mb` MB of bf16, i.e. big_mb / CHUNK_MB chunks."""
    rows = big_mb * 2**20 // (1024 * 2)
    g = torch.Generator().manual_seed(0)
    for side, shift in (("sft", 0.0), ("aligned", 0.01)):
        os.makedirs(root / side)
        tensors = {"model.embed_tokens.weight": (torch.randn(rows, 1024, generator=g) + shift).to(torch.bfloat16),
                   "model.norm.weight": torch.ones(1024, dtype=torch.bfloat16)}
        save_file(tensors, str(root / side / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    return str(root / "sft"), str(root / "aligned")


def _run(root, big_mb: int) -> dict:
    sft, aligned = _pair(root, big_mb)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.3",
         "--out", str(root / "out"), "--chunk-mb", str(CHUNK_MB)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_is_bounded_by_chunks_not_tensors(tmp_path):
    small = _run(tmp_path / "small", 64)  # largest tensor 16 chunks
    large = _run(tmp_path / "large", 256)  # largest tensor 64 chunks: 4x the data
    mb = 2**20
    # The engine's own memory: at most 9 chunk buffers plus slack for Python objects, whatever the tensor size.
    bound = 9 * CHUNK_MB * mb + 64 * mb
    for result in (small, large):
        assert result["rc"] == 0
        assert result["peak"] - result["base"] < bound, result
    # Four times the data, the same peak: a read that mapped or buffered whole tensors would add >= 384 MB here.
    assert large["peak"] - small["peak"] < 24 * mb, (small, large)
