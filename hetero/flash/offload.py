"""`--disk-dir`: a copy of the disk-tier tensors, in the compute dtype, on a drive the user chooses.

Useful when the checkpoint sits on a slow or network drive, or is stored in another dtype (no
conversion per read). Files are safetensors, one per group, streamed tensor by tensor (the
safetensors library can only write whole in-memory dicts, which would break the RAM budget for a
large lm_head), each written under a temporary name and renamed when complete.
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from ..checkpoint.catalogue import DTYPES, Catalogue
from ..errors import HeteroError

_NAMES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 8 * 2**20  # bytes converted and written at a time


def _model_id(cat: Catalogue, dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    for f in sorted({t.file for t in cat.tensors.values()}):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{cat.model_dir.name}-{_NAMES[dtype].lower()}-{h.hexdigest()[:12]}"


def _write_group(cat: Catalogue, names, dtype: torch.dtype, dest: Path, accountant):
    header, offset = {}, 0
    for n in names:
        info = cat[n]
        nbytes = torch.Size(info.shape).numel() * dtype.itemsize
        header[n] = {"dtype": _NAMES[dtype], "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for n in names:
            info = cat[n]
            rows = info.shape[0] if len(info.shape) > 1 else 1
            row_bytes = info.nbytes // rows
            step = max(1, CHUNK_BYTES // row_bytes)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                held = (stop - start) * row_bytes * 2
                accountant.reserve("cpu", held, "staging")
                try:
                    part = cat.read_rows(n, start, stop) if len(info.shape) > 1 else cat.read(n)
                    f.write(part.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
                finally:
                    accountant.release("cpu", held, "staging")
    os.replace(tmp, dest)


def offload_copy(cat: Catalogue, groups, plan, disk_dir, dtype: torch.dtype, accountant, log=print) -> Catalogue | None:
    """Make sure every disk-tier group has a copy under disk_dir; return a catalogue over the copies.

    Returns:
        None when no group is on disk.
    """
    disk = [g for g in groups if plan.tiers[g.name] == "disk"]
    if not disk:
        return None
    root = Path(disk_dir)
    if not root.is_dir():
        raise HeteroError(f"--disk-dir {disk_dir}: not a directory")
    d = root / _model_id(cat, dtype)
    d.mkdir(exist_ok=True)
    todo = [g for g in disk if not (d / f"{g.name}.safetensors").is_file()]
    if todo:
        log(f"writing {len(todo)} disk-tier group(s) to {d} ...")
    for g in todo:
        try:
            _write_group(cat, g.tensors, dtype, d / f"{g.name}.safetensors", accountant)
        except OSError as e:
            raise HeteroError(f"--disk-dir {disk_dir}: cannot write the offload copy ({e.strerror})") from None
    return Catalogue(d)
