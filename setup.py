from setuptools import find_packages, setup

setup(
    name="hetero",
    version="0.1.0",
    description="Run large language models on hardware whose memory is too small for them.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hetero", "hetero.*"]),
    install_requires=[
        # The pin takes the CPU wheel on CI machines; CUDA builds of 2.13.0 satisfy it too.
        "torch==2.13.0",
        "numpy",
        "safetensors",
        "tokenizers",
        "jinja2",
        "gguf",
        "psutil",
        "click",
        "rich",
    ],
    extras_require={
        "test": ["pytest", "transformers", "accelerate"],
    },
    entry_points={"console_scripts": ["hetero=hetero.cli:main"]},
)
