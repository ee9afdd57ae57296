"""The tensor catalogue of a safetensors checkpoint: where every tensor's bytes are, read from the headers.

Only the JSON headers are parsed here; tensor bytes are read on demand with pread into buffers the
runtime owns (no mmap), so what the process holds is exactly what the accountant counts.
"""

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..errors import HeteroError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# files hetero writes next to a model (experts/predictor.py, experts/recording.py): not weights
SIDE_FILES = ("routing-predictor.safetensors", "routing-trace.safetensors")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HeteroError(f"{path}: truncated safetensors file ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise HeteroError(f"{path}: corrupt or truncated safetensors header; download the file again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HeteroError(f"{path}: corrupt safetensors header (not JSON); download the file again") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HeteroError(f"{path}: tensor {name!r} has an unreadable or unsupported header entry") from None
        nbytes = prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise HeteroError(f"{path}: tensor {name!r} header says {end - begin} bytes for shape {shape}")
        if 8 + n + end > size:
            raise HeteroError(
                f"{path}: truncated — tensor {name!r} ends at byte {8 + n + end} but the file has {size}; "
                "download it again"
            )
        out[name] = TensorInfo(name, shape, dtype, path, 8 + n + begin, nbytes)
    return out


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HeteroError(f"{index}: corrupt index (no weight_map)") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HeteroError(f"{model_dir}: shards listed in the index are missing: {', '.join(missing[:3])}")
        return files
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.name not in SIDE_FILES)
    if files:
        return files
    pickled = [p.name for p in model_dir.iterdir() if p.suffix in PICKLED_SUFFIXES]
    if pickled:
        raise HeteroError(
            f"{model_dir}: only pickled weights ({pickled[0]}); hetero never unpickles files. Convert them to "
            "safetensors first, e.g. with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise HeteroError(f"{model_dir}: no *.safetensors weights found")


class Catalogue:
    """Every tensor of a checkpoint by HF name, and reads of their bytes.

    Args:
        model_dir: a directory with one or more *.safetensors files (with or without an index).
    """

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in _safetensors_files(self.model_dir):
            self.tensors.update(_read_header(path))
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_into(self, name: str, out: torch.Tensor, byte_offset: int = 0) -> torch.Tensor:
        """Read `out.nbytes` bytes of tensor `name`, starting `byte_offset` into its data, into `out`."""
        info = self.tensors[name]
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        if byte_offset + len(view) > info.nbytes:
            raise ValueError(f"read past the end of {name}")
        fd, pos, done = self._fd(info.file), info.offset + byte_offset, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise HeteroError(f"{info.file}: file ended while reading {name}; the checkpoint is truncated")
            done += n
        return out

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype, in a fresh CPU buffer."""
        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor (row-major), e.g. a slice of an embedding table."""
        info = self.tensors[name]
        row = prod(info.shape[1:]) * info.dtype.itemsize
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype)
        return self.read_into(name, out, start * row)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
