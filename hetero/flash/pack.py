"""The packed format: a model's weights laid out for direct I/O, one extent per tensor group.

A pack is a directory holding `weights.bin` and `manifest.json`:
- one extent per group (a layer's attention, a layer's MLP, each expert's gate+up+down, embed,
  lm_head, norms), in execution order, each starting on a 4 KiB boundary and padded to one, so a
  group is one aligned O_DIRECT read (split in CHECK_BLOCK pieces that reader threads share);
- float packs (float32 / bfloat16 / float16) store every tensor of an extent back to back in that
  dtype, so an extent read into a buffer *is* the tensors (views, no copy);
- int8 / int4 packs store 2-D weights quantized (flash/quant.py) with their scales, and keep 1-D
  tensors (norms, biases) in the checkpoint's dtype;
- bf16z packs store the weight matrices of the layers (and experts) as bfloat16 compressed without
  loss (flash/lossless.py: 12 bits a weight, decoded bit for bit) and everything else as bfloat16;
  embed and lm_head stay plain, as they are read by rows;
- the manifest gives every tensor's offset, shape, dtype and quantization parameters, and a crc32
  of every CHECK_BLOCK of every extent, checked on the first read.

A pack is written under a temporary name and renamed into place when complete (manifest last), so
an interrupted pack leaves nothing that looks valid.
"""

import hashlib
import json
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.catalogue import DTYPES
from ..errors import HeteroError
from . import lossless, quant
from .reader import aligned_empty, open_file

VERSION = 1
ALIGN = 4096  # extent alignment: what O_DIRECT needs
PIECE_ALIGN = 64  # of quantized data and scales inside an extent
CHECK_BLOCK = 4 * 2**20  # checksum (and read request) granularity inside an extent
PACK_CHUNK = 16 * 2**20  # source bytes converted and written at a time while packing
READ_SLACK = 4 * ALIGN  # row reads are widened to ALIGN at both ends, for data and scales (plan.HEAD_READ_SLACK)
DEFAULT_GROUP_SIZE = 64
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
NAMES = {v: k for k, v in DTYPES.items()}
TORCH_NAMES = {v: k for k, v in FLOATS.items()}


def round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class PackFormat:
    """What a pack stores: a float dtype, bf16z (bfloat16, losslessly compressed), or int8/int4 with a
    quantization group size."""

    dtype: str
    group_size: int = DEFAULT_GROUP_SIZE

    @classmethod
    def parse(cls, dtype, group_size: int | None = None) -> "PackFormat":
        """From a dtype name (bf16, bf16z, fp16, float32, int8, int4; "int8-g32" names a group size) or a torch dtype."""
        if isinstance(dtype, str) and "-g" in dtype:
            dtype, gs = dtype.split("-g", 1)
            group_size = group_size or (int(gs) if gs.isdigit() else -1)
        name = TORCH_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else ALIASES.get(dtype, dtype)
        if name not in FLOATS and name not in ("int8", "int4", "bf16z"):
            raise HeteroError(f"pack dtype {dtype!r}: choose one of bf16, bf16z, fp16, float32, int8, int4")
        gs = group_size or DEFAULT_GROUP_SIZE
        if gs <= 0 or gs % 2:
            raise HeteroError(f"--group-size {gs}: must be a positive even number")
        return cls(name, gs if name in ("int8", "int4") else 0)

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.dtype)

    @property
    def codec(self) -> str | None:
        """The lossless codec of a compressed float pack (bf16z), else None."""
        return lossless.CODEC if self.dtype == "bf16z" else None

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The dtype a float pack stores its unquantized float tensors in (None: the checkpoint's own)."""
        return torch.bfloat16 if self.codec else FLOATS.get(self.dtype)

    @property
    def tag(self) -> str:
        return f"{self.dtype}-g{self.group_size}" if self.bits else self.dtype


def _quantizable(shape, fmt: PackFormat) -> bool:
    return fmt.bits is not None and len(shape) == 2 and shape[1] % fmt.group_size == 0


def compressible(name: str, shape, stored: torch.dtype, kind: str, fmt: PackFormat) -> bool:
    """A tensor that a compressed pack stores through its codec: a layer's (or expert's) weight matrix.
    embed and lm_head stay plain: they are read by rows (Pack.read_rows), not as whole extents."""
    return fmt.codec is not None and kind not in ("embed", "lm_head") and lossless.eligible(shape, stored.is_floating_point)


def layout(tensors: dict, groups, fmt: PackFormat, codecs: dict | None = None) -> dict:
    """The manifest's extents (offsets, shapes, dtypes, quantization, codecs) for `tensors` in `fmt`; a pure function.

    Args:
        tensors: name -> (shape, stored torch dtype), as api.checkpoint_tensors gives.
        groups: the model's groups in execution order.
        codecs: a compressed pack's per-tensor statistics, name -> (exponent base, escapes), as
            codec_stats gives: exact sizes. Without them (planning before the weights are read) the
            escapes are estimated (lossless.ESCAPE_GUESS) and the sizes are close, not exact.
    Returns:
        {group name: {"offset", "nbytes" (padded), "data_bytes", "tensors": {name: entry}}}.
    """
    out, offset = {}, 0
    for g in groups:
        entries, pos = {}, 0
        for name in g.tensors:
            shape, stored = tensors[name]
            n = prod(shape)
            if fmt.bits or fmt.codec:  # pieces that kernels view in other dtypes start aligned
                pos = round_up(pos, PIECE_ALIGN)
            if _quantizable(shape, fmt):
                # int4 packs keep the embedding and lm_head at int8, as llama.cpp's Q4 mixes keep
                # them wider: at 4 bits they alone cost small models most of their accuracy
                bits = 8 if g.kind in ("embed", "lm_head") else fmt.bits
                qbytes = n * bits // 8
                sbytes = shape[0] * (shape[1] // fmt.group_size) * 2  # float16 scales
                e = {"shape": list(shape), "dtype": f"int{bits}", "offset": pos, "nbytes": qbytes,
                     "group_size": fmt.group_size, "scale_dtype": "F16",
                     "scale_offset": round_up(pos + qbytes, PIECE_ALIGN), "scale_nbytes": sbytes}
                pos = e["scale_offset"] + sbytes
            elif compressible(name, shape, stored, g.kind, fmt) and _worth(codecs, name, n):
                base, escapes = codecs[name] if codecs else (None, lossless.guess_escapes(n))
                e = {"shape": list(shape), "dtype": "bfloat16", "codec": fmt.codec, "exp_base": base,
                     "offset": pos, "nbytes": n, "code_offset": round_up(pos + n, PIECE_ALIGN), "code_nbytes": n // 2}
                e.update(esc_offset=round_up(e["code_offset"] + n // 2, PIECE_ALIGN), escapes=escapes)
                pos = e["esc_offset"] + 5 * escapes  # uint32 positions, then uint8 exponents
            else:
                dt = fmt.float_dtype if not fmt.bits and fmt.float_dtype and stored.is_floating_point else stored
                e = {"shape": list(shape), "dtype": NAMES[dt], "offset": pos, "nbytes": n * dt.itemsize}
                pos += e["nbytes"]
            entries[name] = e
        out[g.name] = {"offset": offset, "nbytes": round_up(max(pos, 1)), "data_bytes": pos, "tensors": entries}
        offset += out[g.name]["nbytes"]
    return out


def _worth(codecs: dict | None, name: str, n: int) -> bool:
    return codecs is None or (name in codecs and lossless.worth_it(n, codecs[name][1]))


def staging_extents(extents: dict, dtype: torch.dtype) -> dict:
    """group -> (extent bytes, data bytes, tensors are views in `dtype`, decoder), what plan.staging_bytes
    and the cost model need; the decoder is what turns a non-view extent into tensors: "int8" / "int4"
    (dequantization), a lossless codec ("exp4"), or None (views, or a dtype conversion)."""
    return {g: (x["nbytes"], x["data_bytes"], _is_view(x, dtype), _decoder(x)) for g, x in extents.items()}


def planned_extents(tensors: dict, groups, fmt: PackFormat, dtype: torch.dtype) -> dict:
    """staging_extents(layout(tensors, groups, fmt), dtype), laying out each distinct group shape once.

    A group's extent depends only on its kind and its tensors' shapes and dtypes, and an MoE repeats
    one expert's shapes thousands of times: Qwen3-235B-A22B's 36K tensors took 0.4-0.5 s a layout,
    which `hetero plan` pays once per pack format it weighs.
    """
    memo, out = {}, {}
    for g in groups:
        key = (g.kind, tuple((tuple(tensors[n][0]), tensors[n][1]) for n in g.tensors))
        if key not in memo:
            memo[key] = staging_extents(layout(tensors, [g], fmt), dtype)[g.name]
        out[g.name] = memo[key]
    return out


def _is_view(x: dict, dtype: torch.dtype) -> bool:
    return all(e["dtype"] == NAMES[dtype] and "scale_offset" not in e and "codec" not in e for e in x["tensors"].values())


def _decoder(x: dict) -> str | None:
    for e in x["tensors"].values():
        if "codec" in e:
            return e["codec"]
        if "scale_offset" in e:
            return e["dtype"]
    return None


def fingerprint(cat) -> str:
    """Identifies the checkpoint's files (paths, sizes, modification times), so a stale pack is rebuilt."""
    h = hashlib.sha256()
    for f in sorted({t.file for t in cat.tensors.values()}):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def pack_roots(disk_dir=None) -> list:
    """Where a model's packs are looked for and written, in order: `disk_dir` when given, else next to the
    model (root None), then the store's packs directory (the model's directory may be read-only)."""
    from ..store import home

    return [Path(disk_dir)] if disk_dir is not None else [None, home() / "packs"]


def has_pack(model_dir: Path, fmt: PackFormat, disk_dir=None) -> bool:
    """True when a pack of `model_dir` in `fmt` has been written (whether it is stale is not checked)."""
    return any((pack_path(model_dir, fmt, root) / "manifest.json").is_file() for root in pack_roots(disk_dir))


def pack_path(model_dir: Path, fmt: PackFormat, root: Path | None = None) -> Path:
    """Where the pack of `model_dir` in `fmt` lives: in `root` when given, else inside the model directory."""
    model_dir = Path(model_dir)
    if root is None:
        return model_dir / f"hetero-pack.{fmt.tag}"
    return Path(root) / f"{model_dir.name}.hetero-pack.{fmt.tag}"


# ------------------------------------------------------------------ writing


def _bits(e: dict) -> int:
    return 8 if e["dtype"] == "int8" else 4


def _scale_store(s: torch.Tensor) -> torch.Tensor:
    # float16 scales; a group whose scale underflows float16 stores zeros (|w| < 1e-5, negligible)
    return s.clamp(max=65504.0).to(torch.float16)


def _row_chunks(cat, name: str, shape, chunk: int, reserve):
    """(first row, rows [start, stop) as read) of a tensor in pieces of about chunk / 3 source bytes,
    each reserved (source rows + a float32 working copy + output) while the caller holds it."""
    rows = shape[0] if len(shape) > 1 else 1
    row_src = cat[name].nbytes // rows
    step = max(1, chunk // (3 * max(1, row_src)))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        held = 3 * (stop - start) * row_src
        reserve(held)
        try:
            yield start, (cat.read_rows(name, start, stop) if len(shape) > 1 else cat.read(name))
        finally:
            reserve(-held)


def _write_tensor(f, cat, name: str, e: dict, base: int, fmt: PackFormat, chunk: int, reserve):
    shape = tuple(e["shape"])
    rows = shape[0] if len(shape) > 1 else 1
    found = []  # a compressed tensor's escapes, written after its last chunk
    for start, part in _row_chunks(cat, name, shape, chunk, reserve):
        if "codec" in e:
            cols = shape[1]
            lo, codes, pos, exps = lossless.encode(part, e["exp_base"], start * cols)
            os.pwrite(f, lo.tobytes(), base + e["offset"] + start * cols)
            os.pwrite(f, codes.tobytes(), base + e["code_offset"] + start * cols // 2)
            found.append((pos, exps))
        elif "scale_offset" in e:
            q, s = quant.quantize(part, _bits(e), fmt.group_size)
            qrow, srow = e["nbytes"] // rows, e["scale_nbytes"] // rows
            os.pwrite(f, q.contiguous().view(torch.uint8).numpy().tobytes(), base + e["offset"] + start * qrow)
            os.pwrite(f, _scale_store(s).view(torch.uint8).numpy().tobytes(), base + e["scale_offset"] + start * srow)
        else:
            data = part.to(DTYPES[e["dtype"]]).contiguous().view(torch.uint8).numpy().tobytes()
            os.pwrite(f, data, base + e["offset"] + start * (e["nbytes"] // rows))
    if "codec" in e:
        pos = np.concatenate([p for p, _ in found])
        if len(pos) != e["escapes"]:  # the statistics pass and this one read different weights
            raise HeteroError(f"{cat.model_dir}: tensor {name!r} changed while it was being packed; pack again")
        os.pwrite(f, pos.astype("<u4").tobytes() + np.concatenate([x for _, x in found]).tobytes(), base + e["esc_offset"])


def codec_stats(cat, tensors: dict, groups, fmt: PackFormat, chunk: int = PACK_CHUNK, reserve=None, progress=None) -> dict:
    """A compressed pack's per-tensor statistics, name -> (exponent base, escapes): one pass over the
    weights that layout() needs for exact sizes. progress: callback(source bytes done)."""
    reserve = reserve or (lambda n: None)
    out, done = {}, 0
    for g in groups:
        for name in g.tensors:
            shape, stored = tensors[name]
            if not compressible(name, shape, stored, g.kind, fmt):
                continue
            hist = sum(lossless.exponent_histogram(part) for _, part in _row_chunks(cat, name, shape, chunk, reserve))
            out[name] = lossless.choose(hist)
            done += cat[name].nbytes
            if progress:
                progress(done)
    return out


def _block_crcs(fd: int, offset: int, nbytes: int, chunk: int) -> list[int]:
    crcs = []
    for b in range(0, nbytes, CHECK_BLOCK):
        crc, end = 0, min(nbytes, b + CHECK_BLOCK)
        for pos in range(b, end, chunk):
            crc = zlib.crc32(os.pread(fd, min(chunk, end - pos), offset + pos), crc)
        crcs.append(crc)
    return crcs


def write_pack(cat, tensors: dict, groups, dest: Path, fmt: PackFormat, progress=None, reserve=None) -> Path:
    """Write the pack of a checkpoint to `dest` (a directory), atomically.

    Args:
        cat: the checkpoint's Catalogue.
        tensors: name -> (shape, stored dtype) of the tensors the model uses.
        groups: the model's groups in execution order.
        fmt: the PackFormat.
        progress: callback(bytes done, bytes total), or None.
        reserve: callback(nbytes) reserving (positive) or releasing (negative) host memory for the
            conversion buffers, e.g. with the runtime's accountant; None: no accounting.
    Returns:
        dest.
    """
    dest = Path(dest)
    reserve = reserve or (lambda n: None)
    codecs, first = None, 0
    if fmt.codec:  # a first pass for the codec's statistics; the bar counts the bytes of both passes
        first = sum(cat[n].nbytes for g in groups for n in g.tensors if compressible(n, *tensors[n], g.kind, fmt))
        guess = first + sum(x["nbytes"] for x in layout(tensors, groups, fmt).values())
        codecs = codec_stats(cat, tensors, groups, fmt, PACK_CHUNK, reserve, progress and (lambda d: progress(d, guess)))
    extents = layout(tensors, groups, fmt, codecs)
    total = sum(x["nbytes"] for x in extents.values())
    report = progress and (lambda done: progress(first + min(done, total), first + total))
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by an interrupted pack
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fd = os.open(tmp / "weights.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, total)  # padding reads back as zeros
            done = 0
            for g in groups:
                x = extents[g.name]
                for name, e in x["tensors"].items():
                    _write_tensor(fd, cat, name, e, x["offset"], fmt, PACK_CHUNK, reserve)
                    done += e["nbytes"] + e.get("scale_nbytes", 0) + e.get("code_nbytes", 0)
                    if report:
                        report(done)
                x["crc32"] = _block_crcs(fd, x["offset"], x["nbytes"], 2**20)
                done = x["offset"] + x["nbytes"]
            os.fsync(fd)
        finally:
            os.close(fd)
        manifest = {"format": "hetero-pack", "version": VERSION, "dtype": fmt.dtype, "group_size": fmt.group_size,
                    "align": ALIGN, "check_block": CHECK_BLOCK, "source": str(cat.model_dir), "fingerprint": fingerprint(cat),
                    "file": "weights.bin", "file_bytes": total, "extents": extents}
        (tmp / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
        if report:
            report(total)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# ------------------------------------------------------------------ reading


class Pack:
    """An opened pack: where each group's extent is, and how its bytes become tensors.

    Args:
        path: the pack directory.
    Raises:
        HeteroError: no manifest, an unknown version, or a weights file of the wrong size.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        try:
            m = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HeteroError(f"{mf}: not a readable hetero pack manifest ({e.__class__.__name__}); delete "
                              f"{self.path} and pack again") from None
        if m.get("format") != "hetero-pack" or m.get("version") != VERSION:
            raise HeteroError(f"{mf}: not a version-{VERSION} hetero pack; delete {self.path} and pack again")
        self.manifest, self.extents = m, m["extents"]
        self.format = PackFormat.parse(m["dtype"], m["group_size"] or None)
        self.file = self.path / m["file"]
        size = self.file.stat().st_size if self.file.is_file() else 0
        if size != m["file_bytes"]:
            cut = [g for g, x in self.extents.items() if x["offset"] + x["nbytes"] > size]
            where = f"; extent {cut[0]!r} (bytes {self.extents[cut[0]]['offset']}-" \
                    f"{self.extents[cut[0]]['offset'] + self.extents[cut[0]]['nbytes']}) is cut off" if cut else ""
            raise HeteroError(f"{self.file}: truncated or damaged pack ({size} bytes, the manifest says "
                              f"{m['file_bytes']}){where}; delete {self.path} and pack again")
        self.where = {n: g for g, x in self.extents.items() for n in x["tensors"]}
        self.verified: set[str] = set()  # extents whose checksums passed
        self._views: dict = {}
        self._fd = None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def blocks(self, group: str) -> list[tuple[int, int, int]]:
        """(offset in the file, bytes, crc32) of each checksummed block of a group's extent."""
        x = self.extents[group]
        return [(x["offset"] + i * CHECK_BLOCK, min(CHECK_BLOCK, x["nbytes"] - i * CHECK_BLOCK), crc)
                for i, crc in enumerate(x["crc32"])]

    def corrupt(self, group: str, what: str) -> HeteroError:
        return HeteroError(f"{self.file}: extent {group!r} {what}; the pack is damaged — delete {self.path} and "
                           "pack again (hetero packs it anew on the next load)")

    def is_view(self, group: str, dtype: torch.dtype) -> bool:
        """True when the group's tensors are stored exactly in `dtype` (they are views of the read buffer)."""
        key = (group, dtype)
        if key not in self._views:
            self._views[key] = _is_view(self.extents[group], dtype)
        return self._views[key]

    def decode(self, group: str, buf: torch.Tensor, dtype: torch.dtype, out: dict | None = None) -> dict:
        """The group's tensors from its extent's bytes `buf` (uint8, on any device), in `dtype`.

        With `out` (name -> preallocated tensor) every tensor is written there; without it, float
        tensors already in `dtype` are views of `buf` and the others are converted or dequantized.
        """
        res = {}
        for name, e in self.extents[group]["tensors"].items():
            raw = buf[e["offset"]:e["offset"] + e["nbytes"]]
            if "codec" in e:
                codes = buf[e["code_offset"]:e["code_offset"] + e["code_nbytes"]]
                m, at = e["escapes"], e["esc_offset"]
                pos, exps = buf[at:at + 4 * m].view(torch.int32), buf[at + 4 * m:at + 5 * m]
                t = lossless.decode(raw, codes, e["exp_base"], pos, exps, e["shape"], dtype,
                                    out=None if out is None else out[name])
            elif "scale_offset" in e:
                s = buf[e["scale_offset"]:e["scale_offset"] + e["scale_nbytes"]].view(torch.float16)
                rows = e["shape"][0]
                q = raw.view(torch.int8 if e["dtype"] == "int8" else torch.uint8).reshape(rows, -1)
                t = quant.dequantize(q, s.reshape(rows, -1), _bits(e), e["group_size"], dtype,
                                     out=None if out is None else out[name])
            else:
                t = raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])
                if out is not None:  # into the caller's buffer, so nothing keeps `buf` alive
                    t = out[name].copy_(t)
                elif t.dtype != dtype:
                    t = t.to(dtype)
            res[name] = t
        return res

    def _pread(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) as a uint8 tensor, read directly (not through the page cache,
        which streaming lm_head would churn) into an aligned buffer at most READ_SLACK bytes larger."""
        if self._fd is None:
            self._fd, _direct = open_file(self.file, direct=True)
        lo, hi = offset - offset % ALIGN, round_up(offset + nbytes)
        buf = aligned_empty(hi - lo)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], lo + done)
            except OSError as e:
                if e.errno != 22 or not done:  # EINVAL after a short direct read: the end of the file
                    raise
                break
            if n == 0:
                break
            done += n
        if lo + done < offset + nbytes:
            raise HeteroError(f"{self.file}: ends at byte {lo + done}, inside data the manifest places "
                              f"up to byte {offset + nbytes}; the pack is truncated — delete {self.path} and pack again")
        return buf[offset - lo:offset - lo + nbytes]

    def verify(self, group: str, chunk: int = 2**20):
        """Check every block checksum of a group's extent (reading it in `chunk`-byte pieces) once."""
        if group in self.verified:
            return
        for off, n, want in self.blocks(group):
            crc = 0
            for pos in range(off, off + n, chunk):
                crc = zlib.crc32(self._pread(pos, min(chunk, off + n - pos)).numpy(), crc)
            if crc != want:
                raise self.corrupt(group, f"fails its checksum at bytes {off}-{off + n}")
        self.verified.add(group)

    def stored_row_bytes(self, name: str) -> int:
        """Bytes one row of tensor `name` occupies in the pack (quantized data plus scales)."""
        e = self.extents[self.where[name]]["tensors"][name]
        return (e["nbytes"] + e.get("scale_nbytes", 0)) // e["shape"][0]

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor in `dtype` (for embedding gathers and lm_head slices).

        Holds at most the rows' stored bytes plus READ_SLACK (alignment of the direct reads)."""
        group = self.where[name]
        self.verify(group)
        x = self.extents[group]
        e = x["tensors"][name]
        if "codec" in e:  # layout() never compresses what is read by rows (embed, lm_head)
            raise self.corrupt(group, f"stores {name!r} compressed, which is read by rows")
        rows = e["shape"][0]
        t = self._pread(x["offset"] + e["offset"] + start * (e["nbytes"] // rows), (stop - start) * (e["nbytes"] // rows))
        if "scale_offset" not in e:
            return t.view(DTYPES[e["dtype"]]).reshape(stop - start, *e["shape"][1:]).to(dtype)
        srow = e["scale_nbytes"] // rows
        s = self._pread(x["offset"] + e["scale_offset"] + start * srow, (stop - start) * srow)
        s = s.view(torch.float16).reshape(stop - start, -1)
        q = t.view(torch.int8 if e["dtype"] == "int8" else torch.uint8).reshape(stop - start, -1)
        return quant.dequantize(q, s, _bits(e), e["group_size"], dtype)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_pack(path: Path, cat=None) -> Pack | None:
    """The pack at `path` if there is a complete one (and, given the checkpoint `cat`, made from it); else None."""
    if not (Path(path) / "manifest.json").is_file():
        return None
    p = Pack(path)
    if cat is not None and p.fingerprint != fingerprint(cat):
        p.close()
        return None
    return p
