"""Builds the optional fused CPU kernel (expo_engine/_fused.c), a CPython extension. Everything else is in
pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the engine uses its torch kernels
(`expo doctor` says whether it is built, current and used). On Python 3.11 and newer it is built against the stable
ABI (abi3: buffer arguments joined the limited API in 3.11), so one build serves every later Python.
"""

import sys

from setuptools import Extension, setup

ABI3 = sys.version_info >= (3, 11)

setup(
    ext_modules=[
        Extension(
            "expo_engine._fused",
            ["expo_engine/_fused.c"],
            # No contraction or reassociation: the output arithmetic is spelled out (one fma) to match torch.lerp.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-Wno-psabi"],
            define_macros=[("Py_LIMITED_API", "0x030B0000")] if ABI3 else [],
            py_limited_api=ABI3,
            libraries=["m"],
            optional=True,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ABI3 else {},
)
