import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build native/ when a C compiler is there; without one hetero falls back to pure Python."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 — any compiler trouble leaves the fallback in place
            warnings.warn(f"hetero: native reader not built ({e}); the pure-Python reader will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"hetero: native reader not built ({e}); the pure-Python reader will be used")


native = Extension(
    "hetero.flash._native",
    sources=["native/reader.c"],
    extra_compile_args=["-O3", "-std=c11"] if sys.platform != "win32" else [],
    libraries=["pthread"] if sys.platform != "win32" else [],
)

setup(
    name="hetero",
    version="0.1.0",
    description="Run large language models on hardware whose memory is too small for them.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hetero", "hetero.*"]),
    ext_modules=[native] if sys.platform != "win32" else [],
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        # The pin takes the CPU wheel on CI machines; CUDA builds of 2.13.0 satisfy it too.
        "torch==2.13.0",
        "numpy",
        "numba",  # the int8/int4 dequantization kernels on the CPU
        "safetensors",
        "tokenizers",
        "jinja2",
        "gguf",
        "psutil",
        "click",
        "rich",
        "starlette>=0.37",  # hetero serve: the OpenAI-compatible HTTP API
        "uvicorn>=0.30",
        "faiss-cpu",
    ],
    extras_require={
        "test": ["pytest", "transformers", "accelerate", "openai", "httpx"],
    },
    entry_points={"console_scripts": ["hetero=hetero.cli:main"]},
)
