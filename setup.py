"""The package's one compiled part: the one-frame fast path in C (``mplslb.switching._fast``).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built, the package runs the
same path in Python (``mplslb.switching.scalar``) and says so (``mplslb.switching.FAST_PATH``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mplslb.switching._fast",
            ["src/mplslb/switching/_fast.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
