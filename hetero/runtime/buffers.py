"""Host buffers for reads, kept and reused by size instead of freed and allocated again.

A decoded token reads the same extents every time (every layer's attention extent has one size,
every expert's another), so the pipeline's staging and the expert cache's read buffers come back
to a pool and the next read of that size takes one from it. Without the pool, freeing multi-MiB
buffers raises glibc's mmap threshold, later buffers come from the heap, and its fragmentation
grew the resident set ~150 MB past what the accountant held (benchmarks/moe_offload.py, measured
with /proc/self/status). Reuse also spares the page faults of fresh memory on every read.

The pool's bytes, in use or idle, stay reserved with the accountant (when it is given one), so the
accountant counts what the process really holds; idle buffers are given up, largest first, when a
new size would take the pool past its cap.
"""

from ..flash.reader import aligned_empty


class BufferPool:
    """Args:
        accountant: runtime.memory.Accountant to reserve fresh buffers with, or None when the caller
            has reserved the pool's memory already (an expert cache's slots).
        purpose: the accountant's purpose for these bytes ("staging").
        cap: bytes the pool may hold, in use and idle together, before it gives idle buffers up.
        pin: allocate page-locked memory (for copies to CUDA).
    """

    def __init__(self, accountant, purpose: str, cap: int, pin: bool = False):
        self.acc, self.purpose, self.cap, self.pin = accountant, purpose, cap, pin
        self.idle: dict[int, list] = {}  # nbytes -> buffers not in use
        self.held = 0  # bytes of every buffer the pool made and has not given up

    def take(self, nbytes: int):
        """A page-aligned uint8 tensor of `nbytes`: an idle one of that size, else a fresh one."""
        free = self.idle.get(nbytes)
        if free:
            return free.pop()
        self._shrink(self.cap - nbytes)
        if self.acc is not None:
            self.acc.reserve("cpu", nbytes, self.purpose)
        self.held += nbytes
        return aligned_empty(nbytes, pin=self.pin)

    def give(self, buf):
        """Take back a buffer from take() once nothing reads into it or views it any more."""
        self.idle.setdefault(buf.numel(), []).append(buf)

    def _shrink(self, target: int):
        """Give up idle buffers, largest first, until the pool holds at most `target` bytes (or none is idle)."""
        for n in sorted(self.idle, reverse=True):
            bufs = self.idle[n]
            while bufs and self.held > target:
                bufs.pop()
                self._forget(n)
        self.idle = {n: b for n, b in self.idle.items() if b}

    def _forget(self, nbytes: int):
        self.held -= nbytes
        if self.acc is not None:
            self.acc.release("cpu", nbytes, self.purpose)

    def reclaim(self, tier: str, nbytes: int):
        """An accountant's call when a reservation of `nbytes` more on `tier` would not fit: give up idle buffers."""
        if tier == "cpu" and self.acc is not None:
            self._shrink(self.held - nbytes)

    def clear(self):
        """Give up every idle buffer (in-use ones are given back, then freed, by later give() + clear())."""
        self._shrink(-1)
