"""Measurements behind `hetero profile`: each probe times what the runtime really does, the way it does it.

Disk reads, cold: through the runtime's own reader pool (flash/reader.py: O_DIRECT, each extent in
CHECK_BLOCK pieces shared by its threads, a window of extents in flight — what the prefetch pipeline
does), single O_DIRECT preads on the calling thread (how lm_head slices and embedding rows are read
from a pack), and buffered preads into fresh buffers of a file just dropped from the page cache (how
resident weights are loaded). Copies: clones into fresh tensors (the fake gpu's host->device copy,
dtype conversions) and, with CUDA, host->device copies from pageable and pinned memory. Compute:
decode (matrix-vector) and prefill (matrix-matrix) linears on weights larger than the caches, and the
fixed cost of one decode step through each family's own modules at tiny sizes, which is the Python
and dispatch overhead the executor pays per layer, per expert and per step. Contention: pool reads and
decode matvecs alone and at the same time, since the executor overlaps them on the same cores.
"""

import glob
import mmap
import os
import statistics
import threading
import time
from contextlib import contextmanager

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from ..models.common import linear

KiB, MiB = 2**10, 2**20
# read sizes: embedding rows .. LM_HEAD_CHUNK_BYTES slices, and whole tensors either side of 32 MiB, where
# glibc's malloc switches to fresh mmap'd (page-faulting) buffers
BLOCKS = (4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 30 * MiB, 64 * MiB)
MATVEC_COLS = (512, 1024, 2048, 4096)  # input widths: narrow matrices stream more slowly
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFILL_T = 128  # tokens of the matrix-matrix probe: a typical prompt chunk


def _best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` runs: the machine's speed with the least interference from other processes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _drop_cache(fd: int):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------- disk

@contextmanager
def scratch_file(directory, nbytes: int):
    """A file of `nbytes` random-ish bytes in `directory`, written, synced and deleted afterwards."""
    path = os.path.join(directory, f".hetero-profile-{os.getpid()}.bin")
    chunk = os.urandom(MiB) * 4
    try:
        with open(path, "wb") as f:
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _span(block: int, file_bytes: int, quick: bool) -> int:
    """Bytes read per measurement at one block size: enough reads to average, little enough to be quick."""
    want = {4 * KiB: 4 * MiB, 64 * KiB: 16 * MiB}.get(block, (32 if quick else 128) * MiB)
    return max(block, min(file_bytes, max(want, 2 * block)) // block * block)


def disk_read(path: str, quick: bool) -> dict:
    """Cold-cache read bandwidth per read size, as [[bytes, bytes/s], ...] per mode.

    Modes: "pool" (extents of that size streamed through the runtime's reader pool, POOL_WINDOW in
    flight: the prefetch pipeline's reads and expert fetches), "direct" (O_DIRECT preads on this
    thread: lm_head slices, embedding rows) and "buffered" (preads into fresh buffers: loading).
    Repeats go round all sizes in turn, so that each size is sampled at several moments and the best
    of them is the disk's speed with the least interference from other processes.
    """
    from ..flash.reader import make_reader

    size = os.path.getsize(path)
    repeats = 2 if quick else 3  # (4 took 9 s of the 30 the whole profile may take)
    best = {m: {b: float("inf") for b in BLOCKS} for m in ("buffered", "direct", "pool")}
    fd = os.open(path, os.O_RDONLY)
    direct = _open_direct(path)
    reader = make_reader() if direct is not None else None
    try:
        for _ in range(repeats):
            for block in BLOCKS:
                span = _span(block, size, quick)
                best["buffered"][block] = min(best["buffered"][block], _buffered_once(fd, block, span))
                if direct is not None:
                    best["direct"][block] = min(best["direct"][block], _direct_once(direct, block, span))
                    best["pool"][block] = min(best["pool"][block], _pool_once(reader, direct, block, span, size))
    finally:
        _drop_cache(fd)
        os.close(fd)
        if direct is not None:
            os.close(direct)
        if reader is not None:
            reader.close()
    rows = {mode: [[b, _span(b, size, quick) / t] for b, t in times.items()] for mode, times in best.items()}
    return {"buffered": rows["buffered"], "direct": rows["direct"] if direct is not None else None,
            "pool": rows["pool"] if direct is not None else None}


POOL_WINDOW = 2  # extents in flight: the pipeline's depth-1 window (this layer's reads and the next's)


def _pool_once(reader, fd: int, extent: int, span: int, file_bytes: int) -> float:
    """Seconds to stream span // extent extents through the reader pool, each in CHECK_BLOCK pieces.

    Extents start a gap apart (the groups a plan keeps resident lie between the ones it reads), and a
    new one is submitted as each lands, as runtime/pipeline.py does.
    """
    from ..flash.pack import CHECK_BLOCK
    from ..flash.reader import aligned_empty

    n = max(1, span // extent)
    stride = max(extent, (file_bytes // n) // 4096 * 4096)
    offsets = [(i * stride) % max(1, file_bytes - extent) // 4096 * 4096 for i in range(n)]
    buf = aligned_empty(extent)  # the same buffer for every extent: the reads' timing, not their data, is wanted
    pieces = [(p, min(CHECK_BLOCK, extent - p)) for p in range(0, extent, CHECK_BLOCK)]

    def submit(off):
        return [reader.submit(fd, buf[p:p + k], off + p) for p, k in pieces]

    t0 = time.perf_counter()
    flight, rest = [submit(off) for off in offsets[:POOL_WINDOW]], offsets[POOL_WINDOW:]
    while flight:
        for h in flight.pop(0):
            reader.wait(h)
        if rest:
            flight.append(submit(rest.pop(0)))
    return time.perf_counter() - t0


CONTENTION_EXTENT = 4 * MiB  # the reads of the contention probe: the pool table's best size
CONTENTION_COLS = 2048  # ... and its matvecs: a decode's typical input width


def contention(path: str, quick: bool) -> dict | None:
    """How much the reader pool's reads and the decode's matvecs slow each other down when they run at
    the same time, as the executor overlaps them: {dtype: {"disk": x, "compute": x}}, each the time the
    same work takes concurrently over its time alone (>= 1 where they compete; None without O_DIRECT).

    On a machine with few cores the pool's threads wait for a core while torch's threads compute, and
    the reads' completions wait to be handled (measured here, 2 cores: pool reads 1.2-1.6x slower under
    bfloat16 matvecs; decode read 2.4 GB/s where the idle pool table says 3.8). Each phase (reads
    alone, matvecs alone, both) runs for the same window; the median of `rounds` rounds.
    """
    from ..flash.reader import make_reader

    direct = _open_direct(path)
    if direct is None:
        return None
    size = os.path.getsize(path)
    window = 0.15 if quick else 0.2  # (each 16 MiB pass of reads takes ~5 ms here: a window averages dozens)
    rounds = 1 if quick else 2
    reader = make_reader()

    def reads():
        _pool_once(reader, direct, CONTENTION_EXTENT, 16 * MiB, size)

    out = {}
    try:
        for name, dtype in DTYPES.items():
            buf = torch.full((pool_bytes("cpu", quick) // dtype.itemsize,), 0.01, dtype=dtype)
            ws, x = _matvec_pool(buf, CONTENTION_COLS, MATVEC_BYTES)

            def matvecs():
                for w in ws:
                    linear(x, w)

            disk, comp = [], []
            for _ in range(rounds):
                r_alone, c_alone = _rate_for(window, reads), _rate_for(window, matvecs)
                r_both, c_both = _concurrently(window, reads, matvecs)
                disk.append(r_alone / r_both)
                comp.append(c_alone / c_both)
            out[name] = {"disk": max(1.0, statistics.median(disk)), "compute": max(1.0, statistics.median(comp))}
    finally:
        os.close(direct)
        reader.close()
    return out


def _rate_for(window: float, fn) -> float:
    """Calls of fn per second over `window` seconds (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def _concurrently(window: float, reads, compute) -> tuple[float, float]:
    """(calls per second of `reads` on a thread, of `compute` on this one), both running for `window` seconds."""
    stop, count = threading.Event(), [0, 0.0]

    def loop():
        t0 = time.perf_counter()
        while not stop.is_set():
            reads()
            count[0] += 1
        count[1] = time.perf_counter() - t0

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        rate = _rate_for(window, compute)
    finally:
        stop.set()
        th.join()
    return count[0] / max(count[1], 1e-9), rate


def _buffered_once(fd: int, block: int, span: int) -> float:
    _drop_cache(fd)
    t0 = time.perf_counter()
    for off in range(0, span, block):
        buf = torch.empty(block, dtype=torch.uint8)  # a fresh buffer per read, as the runtime does
        os.preadv(fd, [memoryview(buf.numpy())], off)
    return time.perf_counter() - t0


def _open_direct(path: str) -> int | None:
    """A file descriptor with O_DIRECT, or None where direct I/O is unsupported (e.g. tmpfs, macOS)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCKS[0])
        os.preadv(fd, [buf], 0)
        buf.close()
        return fd
    except OSError:
        return None


def _direct_once(fd: int, block: int, span: int) -> float:
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    try:
        t0 = time.perf_counter()
        for off in range(0, span, block):
            os.preadv(fd, [buf], off)
        return time.perf_counter() - t0
    finally:
        buf.close()


# ---------------------------------------------------------------- memory and copies

def host_clone(quick: bool) -> list:
    """Bandwidth of cloning a tensor into a fresh one, per block size (fake-gpu copies, dtype conversion)."""
    rows = []
    for block in BLOCKS:
        src = torch.ones(block, dtype=torch.uint8)
        n = max(4, min(256, (16 if quick else 64) * MiB // block))
        src.clone()
        rows.append([block, n * block / _best_time(lambda: [src.clone() for _ in range(n)], 3)])
    return rows


def ram_read(quick: bool) -> float:
    """memcpy bandwidth between two existing buffers larger than any cache."""
    n = (64 if quick else 256) * MiB
    a, b = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    b.copy_(a)
    return n / _best_time(lambda: b.copy_(a), 3 if quick else 5)


def host_to_device(quick: bool) -> dict:
    """CUDA host->device bandwidth per block size from pageable and pinned memory, and device->host."""
    out = {}
    for kind in ("pageable", "pinned"):
        rows = []
        for block in BLOCKS:
            src = torch.ones(block, dtype=torch.uint8, pin_memory=kind == "pinned")
            n = max(4, min(256, (64 if quick else 256) * MiB // block))

            def copies():
                for _ in range(n):
                    src.to("cuda", non_blocking=False)
                torch.cuda.synchronize()

            copies()
            rows.append([block, n * block / _best_time(copies, 3)])
        out[kind] = rows
    big = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")

    def back():
        big.cpu()
        torch.cuda.synchronize()

    back()
    out["device_to_host_bps"] = big.numel() / _best_time(back, 3)
    return out


# ---------------------------------------------------------------- compute

def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_loop(fn, device: str, budget_s: float) -> float:
    """Median seconds of a call of fn, calling it (after a warm-up) until `budget_s` has passed, at least 3 times.

    The median, not the fastest: predictions are compared with typical decode steps, and on a shared
    machine the fastest call is one no other work happened to slow down."""
    fn()
    _sync(device)
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (sysfs; 32 MiB when it cannot be read): what a streaming probe must exceed."""
    best = 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": KiB, "M": MiB, "G": 2**30}.get(text[-1:].upper(), 1)
        try:
            best = max(best, int(text.rstrip("KkMmGg")) * scale)
        except ValueError:
            continue
    return best or 32 * MiB


MATVEC_BYTES = 4 * MiB  # matrix size of the matvec table's rows
CALL_SIZES = (MiB // 4, MiB // 2, MiB, 2 * MiB, 4 * MiB)  # matvec_call fits its intercept over these
CALL_ROUNDS = 6


def pool_bytes(device: str, quick: bool) -> int:
    """Bytes of weights a streaming probe cycles through, so that they come from memory, not a cache."""
    # twice the last-level cache on the cpu (a VM may report a 300 MiB one), past a gpu's L2; never more
    # than an eighth of the free RAM (a small machine profiles on first load)
    if device != "cpu":
        return 1024 * MiB
    ram = psutil.virtual_memory().available // 8
    return min(1024 * MiB, ram, max((64 if quick else 128) * MiB, 2 * last_level_cache_bytes()))


def _matvec_pool(buf: torch.Tensor, cols: int, nbytes: int) -> tuple:
    """(matrices [N, cols] of about `nbytes` each, views of `buf`, which is larger than the caches; the input [1, cols])."""
    n_rows = max(8, nbytes // (cols * buf.element_size()))
    per = n_rows * cols
    ws = [buf[i * per:(i + 1) * per].view(n_rows, cols) for i in range(max(1, buf.numel() // per))]
    return ws, torch.full((1, cols), 0.01, dtype=buf.dtype, device=buf.device)


def _sweep_s(ws, x, device: str, budget_s: float) -> float:
    """Median seconds of one matvec over the pool `ws` (each matrix once per sweep)."""
    def sweep():
        for w in ws:
            linear(x, w)  # as the models compute a decoded token

    return _timed_loop(sweep, device, budget_s) / len(ws)


MATVEC_ROUNDS = 3


def matvec(device: str, dtype: torch.dtype, quick: bool) -> list:
    """Weight bytes per second of [1, K] @ [N, K]^T by input width K, as [[K, bytes/s], ...].

    Each width runs over a pool of MATVEC_BYTES matrices larger than the caches, so the weights stream
    from memory. The widths are timed in turn, MATVEC_ROUNDS rounds, and each width's median round is
    kept: a shared host's memory bandwidth drifts by a quarter from one second to the next (bfloat16
    rows measured one after the other read 7.0-9.8 GB/s), which made the widths disagree by moment.
    """
    budget = (0.05 if quick else 0.15) / MATVEC_ROUNDS
    # one buffer, viewed as each width's matrices: the widths' pools cost the memory of one
    buf = torch.full((pool_bytes(device, quick) // dtype.itemsize,), 0.01, dtype=dtype, device=device)
    pools = {cols: _matvec_pool(buf, cols, MATVEC_BYTES) for cols in MATVEC_COLS}
    times = {cols: [] for cols in MATVEC_COLS}
    for _ in range(MATVEC_ROUNDS):
        for cols, (ws, x) in pools.items():
            times[cols].append(_sweep_s(ws, x, device, budget))
    return [[cols, ws[0].numel() * dtype.itemsize / statistics.median(times[cols])] for cols, (ws, _) in pools.items()]


def matvec_call(device: str, dtype: torch.dtype, quick: bool) -> float:
    """Fixed seconds of one matvec call beyond its bytes (starting the parallel region, the output):
    the intercept of time = bytes / rate + call, fitted over matrices of CALL_SIZES 1024 wide.
    What makes a model's small matrices (attention projections, fine-grained experts) slower per byte.

    The sizes are timed in turn, round after round, and each round is fitted on its own: a shared
    host's memory bandwidth drifts from one second to the next, and sizes timed at different moments
    (the table's rows, then a small probe) gave intercepts that were off by half. The median round's.
    """
    cols = 1024
    pool = pool_bytes(device, quick) // len(CALL_SIZES)  # each round sweeps every size's pool once
    sets = []
    for nbytes in CALL_SIZES:
        n_rows = max(8, nbytes // (cols * dtype.itemsize))
        n = max(2, pool // (n_rows * cols * dtype.itemsize))
        sets.append((n_rows * cols * dtype.itemsize,
                     [torch.full((n_rows, cols), 0.01, dtype=dtype, device=device) for _ in range(n)]))
    x = torch.full((1, cols), 0.01, dtype=dtype, device=device)

    def per_call(ws) -> float:
        t0 = time.perf_counter()
        for w in ws:
            linear(x, w)  # as the models compute a decoded token
        _sync(device)
        return (time.perf_counter() - t0) / len(ws)

    for _, ws in sets:
        per_call(ws)  # warm-up
    rounds = [[per_call(ws) for _, ws in sets] for _ in range(CALL_ROUNDS if quick else 2 * CALL_ROUNDS)]
    return call_intercept([b for b, _ in sets], rounds)


def call_intercept(sizes, rounds) -> float:
    """The median over rounds of each round's fitted intercept of time = bytes / rate + call, kept
    between zero and the round's fastest call (a noisy round can tilt the line either way).

    Args:
        sizes: matrix bytes [n].
        rounds: seconds per call, [rounds][n], the sizes of one round timed one after the other.
    """
    x = np.asarray(sizes, dtype=float)
    fits = []
    for t in rounds:
        t = np.asarray(t, dtype=float)
        fits.append(min(float(t.min()), max(0.0, float(np.polyfit(x, t, 1)[1]))))
    return statistics.median(fits)


def matmul(device: str, dtype: torch.dtype, quick: bool) -> float:
    """Flop/s of [PREFILL_T, C] @ [N, C]^T, the prefill shape."""
    C = 1024 if quick else 2048
    w = torch.full((C, C), 0.01, dtype=dtype, device=device)
    x = torch.full((PREFILL_T, C), 0.01, dtype=dtype, device=device)
    per = _timed_loop(lambda: F.linear(x, w), device, 0.1 if quick else 0.3)
    return 2 * PREFILL_T * C * C / per


def dequantize(device: str, quick: bool) -> dict:
    """{dtype name: bytes/s of output} of decoding an int8 pack's weights into preallocated buffers, as
    the pipeline decodes a non-view extent (flash/quant.py): what a quantized (or converted) disk-tier
    layer costs the compute thread on top of its matvecs."""
    from ..flash import quant

    # 32 MiB of bf16 output, as big as a layer's tensors (smaller ones stay in this VM's 300 MiB L3 and
    # decode twice as fast as the runtime's fresh reads do)
    R, C = (1024 if quick else 4096), 4096
    q, s = quant.quantize(torch.full((R, C), 0.01).to(device), 8, 64)
    out = {}
    for name, dtype in DTYPES.items():
        buf = torch.empty(R, C, dtype=dtype, device=device)
        quant.dequantize(q, s, 8, 64, dtype, out=buf)  # compiles (or loads) the kernel
        per = _timed_loop(lambda: quant.dequantize(q, s, 8, 64, dtype, out=buf), device, 0.05 if quick else 0.15)
        out[name] = R * C * buf.element_size() / per
    return out


def decompress(device: str, quick: bool) -> dict:
    """{codec: {dtype name: bytes/s of output}} of decoding losslessly compressed bfloat16 weights
    (flash/lossless.py) into preallocated buffers, as the pipeline decodes a bf16z pack's extent;
    for the dtypes the codec writes exactly (bfloat16, and float32 of the same values). The calls
    rotate over copies of the input and output sized as the matvec probe's pool, so that, as in the
    runtime, the freshly read input and the buffers come from memory rather than a cache."""
    from ..flash import lossless

    R, C = (1024 if quick else 4096), 4096  # 8 / 32 MiB of bf16 output, a layer tensor's size
    w = (torch.randn(R, C, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    base, _ = lossless.choose(lossless.exponent_histogram(w[:64]))  # a sample: any base decodes at one speed
    lo, codes, pos, exps = (torch.from_numpy(a).to(device) for a in lossless.encode(w, base))
    n = max(2, pool_bytes(device, quick) // (R * C * 3))  # a set: 1.5 bytes in and 2 out per weight
    sets = [(lo.clone(), codes.clone()) for _ in range(n)]
    pos = pos.view(torch.int32)
    out = {}
    for name in ("bfloat16", "float32"):
        bufs = [torch.empty(R, C, dtype=DTYPES[name], device=device) for _ in range(n)]

        def sweep():
            for (l8, c4), buf in zip(sets, bufs):
                lossless.decode(l8, c4, base, pos, exps, (R, C), buf.dtype, out=buf)
        out[name] = n * R * C * bufs[0].element_size() / _timed_loop(sweep, device, 0.05 if quick else 0.15)
    return {lossless.CODEC: out}


def op_overhead(device: str) -> float:
    """Seconds of one tiny linear: the dispatch cost every extra op (a slice, a copy call) adds."""
    w = torch.full((64, 64), 0.01, device=device)
    x = torch.full((1, 64), 0.01, device=device)

    def hundred():
        for _ in range(100):
            F.linear(x, w)

    return _timed_loop(hundred, device, 0.05) / 100
