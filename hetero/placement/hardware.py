"""The hardware profile: what this machine holds and how fast it moves and computes, measured, never typed in.

`hetero profile` measures it (probes.py, overheads.py) in under 30 s and caches it under the
model store home; the cache is used while the hardware fingerprint (CPU model and count, torch
threads, RAM, GPU, the disk under the measured directory) is unchanged. A quick variant (fewer
repeats, about half the time) is measured in a child process the first time a model is planned on a
machine with no profile, so its buffers never count against the caller's memory budget.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from ..errors import HeteroError
from ..sizes import format_size
from . import probes

VERSION = 15  # bump when what is measured, or how, changes: older caches are then re-measured
_FILE = "profile.json"


@dataclass(frozen=True)
class Profile:
    """Measured figures of one machine. Tables are [[block bytes, bytes/s], ...] by ascending block.

    Attributes:
        fingerprint: what the figures depend on (cpu, cpu_count, threads, ram, gpu, disk).
        ram_bytes, gpu_bytes, disk_free_bytes: capacities (gpu_bytes None without CUDA).
        disk_read: {"pool": table | None, "direct": table | None, "buffered": table}, cold: "pool" by extent
            size through the runtime's reader pool (prefetch, expert fetches), "direct" single O_DIRECT
            preads (lm_head slices, embedding rows), "buffered" preads into fresh buffers (loading).
        host_clone: table of copies into fresh host tensors (fake-gpu transfers, dtype conversion).
        ram_read_bps: memcpy between existing buffers.
        host_to_device: {"pageable": table, "pinned": table, "device_to_host_bps": float} or None.
        compute: device ("cpu", "cuda") -> {"matvec": {dtype: [[input width, bytes/s], ...]},
            "matvec_bytes": the size of the matrices it was measured on, "matvec_call_s": {dtype: fixed seconds per matvec call}, "matmul_flops": {dtype: flop/s},
            "op_s": seconds per extra op, "dequant_bps": {dtype: bytes/s of int8 weights decoded into preallocated
            buffers of that dtype}, "lossless_bps": {codec: {dtype: bytes/s of bf16z weights decoded so}}, "overheads": {model_type: {"attn", "mlp", "moe", "expert", "cached_moe", "step"}},
            "contention" (cpu, with O_DIRECT): {dtype: {"disk": x, "compute": x}}, how much slower the pool's
            reads and the decode matvecs run while the other runs (probes.contention)}.
    """

    fingerprint: dict = field(hash=False)
    ram_bytes: int
    gpu_bytes: int | None
    disk_free_bytes: int
    disk_dir: str
    disk_read: dict = field(hash=False)
    host_clone: list = field(hash=False)
    ram_read_bps: float
    host_to_device: dict | None = field(hash=False)
    compute: dict = field(hash=False)
    quick: bool = False
    measured_s: float = 0.0
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> "Profile":
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as e:
            raise HeteroError(f"{source}: not a hetero hardware profile ({e}); run `hetero profile --refresh`") from None

    @classmethod
    def load(cls, path) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise HeteroError(f"{path}: profile file not found")
        return cls.from_json(path.read_text(), str(path))

    def save(self, path):
        path = Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)


# ---------------------------------------------------------------- fingerprint and cache

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _disk_device(directory: Path) -> str:
    st = os.stat(directory)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    model = Path(f"/sys/dev/block/{dev}/device/model")
    return f"{dev} {model.read_text().strip()}" if model.is_file() else dev


def default_disk_dir() -> Path:
    """Where models live: the store's home (created if missing)."""
    from ..store import home

    d = home()
    d.mkdir(parents=True, exist_ok=True)
    return d


def fingerprint(disk_dir=None) -> dict:
    disk_dir = Path(disk_dir) if disk_dir else default_disk_dir()
    return {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "ram": psutil.virtual_memory().total,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "disk": _disk_device(disk_dir),
    }


def cache_path() -> Path:
    return default_disk_dir() / _FILE


def cached(disk_dir=None) -> Profile | None:
    """The cached profile if it was measured on this hardware with this version of the probes, else None."""
    path = cache_path()
    if not path.is_file():
        return None
    try:
        p = Profile.from_json(path.read_text())
    except HeteroError:
        return None
    try:
        if p.version != VERSION or p.fingerprint != fingerprint(disk_dir or p.disk_dir):
            return None
    except OSError:  # the profiled directory is gone
        return None
    if disk_dir is not None and Path(disk_dir).resolve() != Path(p.disk_dir).resolve():
        return None
    return p


# ---------------------------------------------------------------- measuring

def measure(disk_dir=None, quick: bool = False, log=None) -> Profile:
    """Measure this machine (about 10-20 s; `quick`: about 3-5 s with fewer repeats and smaller sweeps)."""
    say = log or (lambda *_: None)
    t0 = time.perf_counter()
    disk_dir = Path(disk_dir) if disk_dir else default_disk_dir()
    if not disk_dir.is_dir():
        raise HeteroError(f"--disk-dir {disk_dir}: not a directory")
    free = shutil.disk_usage(disk_dir).free
    file_bytes = (64 if quick else 256) * probes.MiB
    if free < 2 * file_bytes:
        raise HeteroError(f"{disk_dir}: only {format_size(free)} free; the disk probe needs {format_size(2 * file_bytes)}")
    say("disk reads (page cache dropped) ...")
    with probes.scratch_file(disk_dir, file_bytes) as path:
        disk = probes.disk_read(path, quick)
        say("reads and compute at the same time ...")
        contention = probes.contention(path, quick)
    say("memory copies ...")
    clone, ram = probes.host_clone(quick), probes.ram_read(quick)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    compute = {}
    for dev in devices:
        say(f"compute on {dev} ...")
        compute[dev] = _compute(dev, quick)
    if contention:  # the cpu's matvecs share its cores with the reader pool (a gpu's kernels do not)
        compute["cpu"]["contention"] = contention
    h2d = None
    gpu_bytes = None
    if "cuda" in devices:
        say("host <-> gpu copies ...")
        h2d = probes.host_to_device(quick)
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    return Profile(
        fingerprint=fingerprint(disk_dir), ram_bytes=psutil.virtual_memory().total, gpu_bytes=gpu_bytes,
        disk_free_bytes=free, disk_dir=str(disk_dir), disk_read=disk, host_clone=clone, ram_read_bps=ram,
        host_to_device=h2d, compute=compute, quick=quick, measured_s=time.perf_counter() - t0,
    )


def _compute(device: str, quick: bool) -> dict:
    from . import overheads

    with torch.inference_mode():
        mv = {name: probes.matvec(device, dt, quick) for name, dt in probes.DTYPES.items()}
        call = {name: probes.matvec_call(device, dt, quick) for name, dt in probes.DTYPES.items()}
        mm = {name: probes.matmul(device, dt, quick) for name, dt in probes.DTYPES.items()}
        deq = probes.dequantize(device, quick)
        lossless = probes.decompress(device, quick)
        op = probes.op_overhead(device)
    return {"matvec": mv, "matvec_bytes": probes.MATVEC_BYTES, "matvec_call_s": call, "matmul_flops": mm, "op_s": op,
            "dequant_bps": deq, "lossless_bps": lossless, "overheads": overheads.measure(device, quick)}


def get_profile(disk_dir=None, refresh: bool = False, quick: bool = False, log=None) -> Profile:
    """The cached profile, or a fresh measurement saved to the cache (a quick cache is upgraded when a full one is asked for)."""
    p = None if refresh else cached(disk_dir)
    if p is not None and (quick or not p.quick):
        return p
    p = measure(disk_dir, quick, log)
    p.save(cache_path())
    return p


def ensure_profile(log=None) -> Profile:
    """A profile for planning: the cache, or a quick one measured in a child process and cached."""
    p = cached()
    if p is not None:
        return p
    (log or (lambda *_: None))("measuring this machine once for the planner (under 30 s; `hetero profile` for the full run)")
    proc = subprocess.run([sys.executable, "-m", "hetero.placement.hardware", "--quick"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HeteroError(f"measuring the hardware profile failed: {proc.stderr.strip().splitlines()[-1:]}")
    p = cached()
    if p is None:  # the hardware looks different to the child (e.g. another thread count): use its result
        p = Profile.load(cache_path())
    return p


# ---------------------------------------------------------------- presentation

def _table_str(rows) -> str:
    return ", ".join(f"{format_size(b)} {bps / 1e9:.2f}" for b, bps in rows)


def profile_rows(p: Profile) -> list[tuple[str, str]]:
    """(what, value) rows for `hetero profile`'s table; bandwidths in GB/s."""
    fp = p.fingerprint
    rows = [
        ("machine", f"{fp['cpu']}, {fp['cpu_count']} cpus, {fp['threads']} torch threads" + (f", {fp['gpu']}" if fp["gpu"] else "")),
        ("RAM", format_size(p.ram_bytes)),
        ("GPU memory", format_size(p.gpu_bytes) if p.gpu_bytes else "no accelerator"),
        (f"disk free ({p.disk_dir})", format_size(p.disk_free_bytes)),
        ("disk read, buffered, cold (GB/s by read size)", _table_str(p.disk_read["buffered"])),
        ("disk read, reader pool, O_DIRECT (GB/s by extent size)", _table_str(p.disk_read["pool"]) if p.disk_read.get("pool") else "unsupported here"),
        ("disk read, O_DIRECT (GB/s by read size)", _table_str(p.disk_read["direct"]) if p.disk_read.get("direct") else "unsupported here"),
        ("clone into a fresh host tensor (GB/s)", _table_str(p.host_clone)),
        ("RAM read (memcpy, GB/s)", f"{p.ram_read_bps / 1e9:.2f}"),
    ]
    if p.host_to_device:
        rows.append(("host -> gpu, pageable (GB/s)", _table_str(p.host_to_device["pageable"])))
        rows.append(("host -> gpu, pinned (GB/s)", _table_str(p.host_to_device["pinned"])))
        rows.append(("gpu -> host (GB/s)", f"{p.host_to_device['device_to_host_bps'] / 1e9:.2f}"))
    for dev, c in p.compute.items():
        for k, table in c["matvec"].items():
            rows.append((f"{dev} decode matvec {k} (GB/s of weights by input width)", ", ".join(f"{w} {v / 1e9:.2f}" for w, v in table)))
        if c.get("matvec_call_s"):
            rows.append((f"{dev} decode matvec, fixed cost per call (us)",
                         ", ".join(f"{k} {v * 1e6:.1f}" for k, v in c["matvec_call_s"].items())))
        rows.append((f"{dev} prefill matmul (GFLOP/s)", ", ".join(f"{k} {v / 1e9:.1f}" for k, v in c["matmul_flops"].items())))
        if c.get("dequant_bps"):
            rows.append((f"{dev} int8 weights decoded into (GB/s of output)",
                         ", ".join(f"{k} {v / 1e9:.2f}" for k, v in c["dequant_bps"].items())))
        for codec, rates in (c.get("lossless_bps") or {}).items():
            rows.append((f"{dev} bf16z ({codec}) weights decoded into (GB/s of output)",
                         ", ".join(f"{k} {v / 1e9:.2f}" for k, v in rates.items())))
        if c.get("contention"):
            rows.append((f"{dev} reads / matvecs slower when run together (x)",
                         ", ".join(f"{k} {v['disk']:.2f} / {v['compute']:.2f}" for k, v in c["contention"].items())))
        rows.append((f"{dev} per-op overhead", f"{c['op_s'] * 1e6:.1f} us"))
        for mt, o in c["overheads"].items():
            rows.append((f"{dev} {mt} overhead (us)", ", ".join(f"{k} {v * 1e6:.0f}" for k, v in o.items())))
    rows.append(("measured in", f"{p.measured_s:.1f} s" + (" (quick)" if p.quick else "")))
    return rows


if __name__ == "__main__":  # the child process of ensure_profile
    get_profile(quick="--quick" in sys.argv[1:])
