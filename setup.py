"""Builds the optional fused CPU kernel (expo_engine/_fused.c). Everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the engine uses its torch kernels
(`expo doctor` says whether it is built, current and used).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "expo_engine._fused",
            ["expo_engine/_fused.c"],
            # No contraction or reassociation: the output arithmetic is spelled out (one fma) to match torch.lerp.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-Wno-psabi"],
            libraries=["m"],
            optional=True,
        )
    ]
)
