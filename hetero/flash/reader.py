"""Asynchronous file reads into page-aligned buffers: submit / poll / wait.

The native reader (native/reader.c, built by setup.py as hetero.flash._native) runs a pool of
threads doing pread, and checksums what they read, without the GIL. Where it was not built, a
pure-Python pool with the same API (os.preadv and zlib.crc32, which release the GIL too) stands
in, with one warning.

Files are opened with O_DIRECT on Linux (F_NOCACHE on macOS) so streamed weights do not push
everything else out of the page cache; where the filesystem refuses direct I/O (tmpfs, some
network filesystems) the file is read through the page cache, and that is said once.
"""

import ctypes
import importlib.util
import mmap
import os
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

ALIGN = 4096  # O_DIRECT needs buffer, offset and length aligned to the logical block size (<= 4 KiB)
_said: set[str] = set()


def say_once(key: str, message: str):
    if key not in _said:
        _said.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


HUGE = 2 * 2**20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes` whose data starts on an ALIGN boundary.

    A large unpinned one is its own anonymous mapping whose whole 2 MiB pieces ask for transparent
    huge pages. A direct read is one request to the disk only over physically contiguous memory (the
    virtio disk here takes 254 segments a request): in 4 KiB pages scattered by a memory cgroup's
    reclaim, a 4 MiB read became several, and hetero's reads ran at 1.35-1.65 GB/s under an 893-1093
    MiB limit instead of 2.7-2.9 (benchmarks/ssd_bound.py's model, bf16z pack).
    """
    if pin or nbytes < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
        skip = -raw.data_ptr() % ALIGN
        return raw[skip:skip + nbytes]
    # a length of whole huge pages gets a huge-page-aligned start (Linux >= 6.7); only the whole ones
    # below nbytes are asked for, so the pages ever touched, and held, are the ones up to nbytes: the
    # accountant's figure stays the memory held. The tensor keeps the mapping alive.
    mm = mmap.mmap(-1, -(-nbytes // HUGE) * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE, 0, nbytes // HUGE * HUGE)
    return torch.frombuffer(mm, dtype=torch.uint8)[:nbytes]


def open_file(path, direct: bool = True) -> tuple[int, bool]:
    """(fd, opened for direct I/O) of a file to read."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:  # some filesystems accept the flag but refuse the reads: probe one block
                os.preadv(fd, [memoryview(aligned_empty(ALIGN).numpy())], 0)
                return fd, True
            except OSError:
                os.close(fd)
                raise
        except OSError:
            say_once(f"direct:{os.path.dirname(path)}",
                     f"{path}: the filesystem refuses O_DIRECT; reading through the page cache")
    fd = os.open(path, os.O_RDONLY)
    if direct and sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd, True
    return fd, False


@dataclass(frozen=True)
class Result:
    nbytes: int  # bytes read (fewer than asked at end of file)
    crc: int  # zlib.crc32 of those bytes (0 unless asked for)
    start_ns: int  # time.monotonic_ns() when the read started and ended
    done_ns: int


class _CResult(ctypes.Structure):
    _fields_ = [("nbytes", ctypes.c_int64), ("crc", ctypes.c_uint32), ("start_ns", ctypes.c_int64),
                ("done_ns", ctypes.c_int64)]


def _native_lib():
    spec = importlib.util.find_spec("hetero.flash._native")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)  # a CDLL call drops the GIL for its duration
    except OSError:
        return None
    lib.hr_pool_new.restype = ctypes.c_void_p
    lib.hr_pool_new.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.hr_pool_free.argtypes = [ctypes.c_void_p]
    lib.hr_submit.restype = ctypes.c_int
    lib.hr_submit.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int,
                              ctypes.c_int]
    lib.hr_poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.hr_wait.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_CResult)]
    lib.hr_crc32.restype = ctypes.c_uint32
    lib.hr_crc32.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    return lib


_LIB = _native_lib()


class NativeReader:
    """Reads by the C thread pool. Args: threads: reader threads; capacity: reads in flight at most."""

    kind = "native"

    def __init__(self, threads: int = 4, capacity: int = 256):
        self._pool = _LIB.hr_pool_new(threads, capacity)
        if not self._pool:
            raise MemoryError("could not start the native reader's threads")
        self._buffers: dict[int, torch.Tensor] = {}  # kept alive while a read fills them

    def submit(self, fd: int, buf: torch.Tensor, offset: int, checksum: bool = False, urgent: bool = False) -> int:
        """Queue a read of buf.nbytes bytes at `offset` of `fd` into the uint8 tensor `buf`; returns a handle.

        urgent: put it ahead of every queued read (one the compute thread is about to wait for).
        """
        h = _LIB.hr_submit(self._pool, fd, buf.data_ptr(), buf.numel(), offset, int(checksum), int(urgent))
        if h < 0:
            raise OSError(-h, f"native reader: cannot queue a read ({os.strerror(-h)})")
        self._buffers[h] = buf
        return h

    def poll(self, handle: int) -> bool:
        return bool(_LIB.hr_poll(self._pool, handle))

    def wait(self, handle: int) -> Result:
        """Block until the read is done. Raises OSError for a failed read."""
        out = _CResult()
        rc = _LIB.hr_wait(self._pool, handle, ctypes.byref(out))
        self._buffers.pop(handle, None)
        if rc < 0:
            raise ValueError(f"unknown read handle {handle}")
        if out.nbytes < 0:
            raise OSError(-out.nbytes, os.strerror(-out.nbytes))
        return Result(out.nbytes, out.crc, out.start_ns, out.done_ns)

    def close(self):
        if self._pool:
            _LIB.hr_pool_free(self._pool)  # waits for reads in flight
            self._pool = None

    def __del__(self):
        self.close()


def _pread_all(fd: int, buf: torch.Tensor, offset: int, checksum: bool) -> Result:
    import time

    start = time.monotonic_ns()
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            if e.errno == 22 and done:  # EINVAL retrying past a short direct read: end of file
                break
            raise
        if n == 0:
            break
        done += n
    crc = zlib.crc32(view[:done]) if checksum else 0
    return Result(done, crc, start, time.monotonic_ns())


class PythonReader:
    """The same API on a thread pool of os.preadv calls (used when the native reader is missing)."""

    kind = "python"

    def __init__(self, threads: int = 4, capacity: int = 256):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="hetero-read")
        self._futures: dict[int, object] = {}
        self._next = 0

    def submit(self, fd: int, buf: torch.Tensor, offset: int, checksum: bool = False, urgent: bool = False) -> int:
        # `urgent` is accepted and ignored: the executor's queue is first in, first out
        h, self._next = self._next, self._next + 1
        self._futures[h] = self._pool.submit(_pread_all, fd, buf, offset, checksum)
        return h

    def poll(self, handle: int) -> bool:
        return self._futures[handle].done()

    def wait(self, handle: int) -> Result:
        return self._futures.pop(handle).result()

    def close(self):
        self._pool.shutdown(wait=True)


def make_reader(threads: int = 4, native: bool | None = None):
    """The native reader when built (or when native=True), else the Python fallback with a warning."""
    if native is False:
        return PythonReader(threads)
    if _LIB is None:
        if native:
            raise RuntimeError("the native reader (hetero.flash._native) is not built")
        say_once("native", "hetero's native reader is not built (no C compiler at install?); using the slower "
                           "pure-Python reader. Reinstall with a compiler to build it.")
        return PythonReader(threads)
    return NativeReader(threads)


def crc32(data, crc: int = 0) -> int:
    """zlib.crc32 (which releases the GIL on large buffers)."""
    return zlib.crc32(data, crc)
