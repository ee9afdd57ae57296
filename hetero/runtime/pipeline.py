"""The prefetch pipeline: disk reads ahead of compute, copies to the device, in bounded staging buffers.

The executor drives it, one call per step of its schedule:

    issue(j)              queue reads of the disk-tier groups of the first depth + 1 layers from j on
                          that read anything (one aligned read per CHECK_BLOCK of each group's pack
                          extent) into host buffers; issue_next() at the end of a forward starts
                          the next token's first reads while lm_head computes
    copy(j + 1)           computing on the gpu: land j+1's reads and put j+1 on the device
    take(j)               j's tensors on the compute device (waiting for its reads if late)
    release(j)            give j's buffers back

The expert manager (experts/manager.py) reads disk-homed experts through the same reader with
read_expert / land_host / drop, into buffers its cache slots have reserved already.

Every buffer is reserved with the accountant before it exists, in exactly the amounts that
placement.plan.staging_bytes counts (expert-cache slots: placement.plan.expert_slot_bytes). Groups resident on the compute tier are never touched here.
"""

import time
from bisect import bisect_left
from math import prod
from dataclasses import dataclass, field

import torch

from ..errors import HeteroError
from ..flash.pack import staging_extents
from ..placement.plan import next_token_reads, staging_bytes
from .buffers import BufferPool


@dataclass
class Staged:
    """One layer's (or one expert's) non-resident groups on their way to the compute device."""

    groups: list[str]
    reads: list = field(default_factory=list)  # (reader, handle, group, block offset, length, crc or None)
    raw: dict = field(default_factory=dict)  # group -> host buffer (uint8), reserved on the cpu tier
    decoded: list = field(default_factory=list)  # host buffers (pooled like `raw`) that decoded tensors are views of
    tensors: dict = field(default_factory=dict)  # tensor name -> tensor on the compute device
    held: list = field(default_factory=list)  # (tier, nbytes) reserved for `tensors`
    landed: bool = False
    ready: bool = False
    reserved: bool = True  # its read buffers are reserved as "staging" (False: an expert-cache slot holds them)


class Prefetcher:
    """Args:
        store: the runtime.weights.WeightStore (plan, pack, reader, accountant, device).
        depth: layers read ahead of the one computing.
    """

    def __init__(self, store, depth: int):
        self.store, self.depth = store, depth
        self.acc, self.plan, self.pack = store.acc, store.plan, store.pack
        self.compute, self.dtype = store.compute, store.dtype
        self.n_layers = len(store.model.model.layers)
        self.pin = store.device.kind == "cuda"
        self.staged: dict = {}  # layer index (or expert group name) -> Staged
        self.reads = [k for k in range(self.n_layers)
                      if any(self.plan.tiers[g] == "disk" for g in self._off_device(k))]  # layers that read
        extents = staging_extents(self.pack.extents, self.dtype) if self.pack else None
        groups = list(store.groups.values())
        self.next_reads = next_token_reads(groups, self.plan.tiers, self.compute, depth, extents)
        # read buffers, reused by size: staging within the plan's staging (reserved as they are made,
        # reclaimed when another reservation needs the room); the expert cache's inside its slots
        cap = staging_bytes(groups, self.plan.tiers, self.compute, depth, extents).get("cpu", 0)
        self.buffers = BufferPool(self.acc, "staging", cap, self.pin)
        self.expert_buffers = BufferPool(None, "expert_cache", 1 << 62, self.pin)
        self.acc.reclaimers.append(self.buffers.reclaim)
        self._busy_until = 0  # end of the last counted read interval (ns), for the busy-time union

    def _off_device(self, j: int) -> list[str]:
        return [g for g in self.store.layer_groups.get(j, ()) if self.plan.tiers[g] != self.compute]

    # ------------------------------------------------------------ the schedule's steps

    def issue(self, j: int):
        """Queue the disk reads of the first depth + 1 reading layers from layer j on (those not queued yet)."""
        i = bisect_left(self.reads, j)
        for k in self.reads[i:i + self.depth + 1]:
            if k not in self.staged:
                self.staged[k] = self._read(self._off_device(k))

    def issue_next(self):
        """Queue the next token's first reads (as many as plan.next_token_reads allows beside lm_head)."""
        for k in self.reads[:self.next_reads]:
            if k not in self.staged:
                self.staged[k] = self._read(self._off_device(k))

    def _staged(self, j: int) -> Staged:
        if j not in self.staged:  # a layer without reads (or, after an error, one not re-queued yet)
            self.staged[j] = self._read(self._off_device(j))
        return self.staged[j]

    def copy(self, j: int):
        """Computing on the gpu: put layer j's groups on the device (its reads landed first)."""
        if self.compute != "gpu" or not 0 <= j < self.n_layers:
            return
        self._prepare(self._staged(j))

    def take(self, j: int) -> dict:
        """Layer j's off-device tensors (name -> tensor) on the compute device."""
        s = self._staged(j)
        self._prepare(s)
        return s.tensors

    def release(self, key):
        """Give back every buffer of layer (or expert group) `key`."""
        s = self.staged.pop(key, None)
        if s is None:
            return
        self.drop(s)
        for tier, n in s.held:
            self.acc.release(tier, n, "staging")
        s.held.clear(), s.tensors.clear()

    def fetch(self, group: str) -> dict:
        """One group (an expert) read and prepared now; release(group) gives it back."""
        s = self.staged[group] = self._read([group], urgent=True)
        self._prepare(s)
        return s.tensors

    def read_expert(self, group: str, urgent: bool = False) -> Staged:
        """Queue the reads of one disk-homed expert into a host buffer that an expert-cache slot pays for
        (not reserved here); land_host() makes its tensors, drop() gives it up. urgent: ahead of every
        queued read (a miss the layer computing now waits for, not a prefetch)."""
        return self._read([group], reserve=False, urgent=urgent)

    def land_host(self, s: Staged) -> dict:
        """Wait for an expert's reads (checking checksums the first time) and decode it on the host, in the
        compute dtype: views of the read buffer when the pack stores that dtype, else converted copies."""
        self._land(s)
        (g,) = s.groups
        data = s.raw[g][:self.pack.extents[g]["data_bytes"]]
        if self.pack.is_view(g, self.dtype):
            return self.pack.decode(g, data, self.dtype)
        out = self.pack.decode(g, data, self.dtype, self._host_outputs(s, g))
        self._give(s, s.raw.pop(g))  # converted copies: the read buffer can go
        return out

    def landed(self, s: Staged) -> bool:
        """True when every read of `s` has finished (they are not waited for)."""
        return all(reader.poll(h) for reader, h, *_ in s.reads)

    def drop(self, s: Staged):
        """Give up a Staged's read buffers (an expert-cache entry's, or a layer's), waiting for its reads first."""
        for reader, handle, *_ in s.reads:  # reads still in flight must finish before their buffer goes
            try:
                reader.wait(handle)
            except OSError:
                pass
        s.reads.clear()
        for buf in [*s.raw.values(), *s.decoded]:
            self._give(s, buf)
        s.raw.clear(), s.decoded.clear()

    def _give(self, s: Staged, buf):
        (self.buffers if s.reserved else self.expert_buffers).give(buf)

    def abort(self):
        """After an error: wait for every read in flight and release every buffer (no leak, no stray writes)."""
        for key in list(self.staged):
            self.release(key)
        self.buffers.clear()

    # ------------------------------------------------------------ reading and decoding

    def _read(self, groups: list[str], reserve: bool = True, urgent: bool = False) -> Staged:
        s = Staged(groups, reserved=reserve)
        for g in groups:
            if self.plan.tiers[g] != "disk":
                continue
            blocks = self.pack.blocks(g)
            n = sum(b[1] for b in blocks)
            buf = s.raw[g] = (self.buffers if reserve else self.expert_buffers).take(n)
            check = g not in self.pack.verified
            pos = 0
            for off, length, crc in blocks:
                reader = self.store.reader
                h = reader.submit(self.store.pack_fd, buf[pos:pos + length], off, checksum=check, urgent=urgent)
                s.reads.append((reader, h, g, off, length, crc if check else None))
                pos += length
        return s

    def _land(self, s: Staged):
        """Wait for a Staged's reads; check their lengths and (first time) checksums."""
        if s.landed:
            return
        t0 = time.perf_counter()
        io = self.store.io
        spans = []
        try:
            while s.reads:
                reader, h, g, off, length, crc = s.reads[0]
                try:
                    r = reader.wait(h)
                except OSError as e:
                    raise HeteroError(f"{self.pack.file}: reading extent {g!r} at byte {off} failed: {e.strerror or e}") from None
                finally:
                    s.reads.pop(0)
                if r.nbytes != length:
                    raise self.pack.corrupt(g, f"ends at byte {off + r.nbytes}, inside the {length} bytes the manifest "
                                               f"places at {off} (the file is truncated)")
                if crc is not None and r.crc != crc:
                    raise self.pack.corrupt(g, f"fails its checksum at bytes {off}-{off + length}")
                io["disk_read_bytes"] += length
                spans.append((r.start_ns, r.done_ns))
        finally:
            io["io_stall_s"] += time.perf_counter() - t0
        for start, end in sorted(spans):  # the union of read intervals: time the disk was busy for us
            if end > self._busy_until:
                io["io_busy_s"] += (end - max(start, self._busy_until)) / 1e9
                self._busy_until = end
        if s.raw:
            self.pack.verified.update(s.raw)
        s.landed = True

    def _prepare(self, s: Staged):
        """Make a Staged's tensors ready on the compute device, holding exactly what staging_bytes counts."""
        if s.ready:
            return
        self._land(s)
        for g in s.groups:
            if self.plan.tiers[g] == "disk":
                s.tensors.update(self._decode(s, g))
            else:  # a cpu-resident group, computing on the gpu
                for n, t in self.store.resident[g].items():
                    s.tensors[n] = self._to_gpu(s, t)
        for g in list(s.raw):  # groups decoded into buffers of their own: their read buffers can go now
            if self.compute == "gpu" or not self.pack.is_view(g, self.dtype):
                self._give(s, s.raw.pop(g))
        s.ready = True

    def _hold(self, s: Staged, tier: str, nbytes: int):
        self.acc.reserve(tier, nbytes, "staging")
        s.held.append((tier, nbytes))

    def _to_gpu(self, s: Staged, t: torch.Tensor) -> torch.Tensor:
        self._hold(s, "gpu", t.nbytes)
        self.store.io["host_to_device_bytes"] += t.nbytes
        return self.store.device.to_tier(t, "gpu")

    def _decode(self, s: Staged, g: str) -> dict:
        buf, view = s.raw[g], self.pack.is_view(g, self.dtype)
        data = buf[:self.pack.extents[g]["data_bytes"]]
        if self.compute == "cpu" and view:
            return self.pack.decode(g, data, self.dtype)  # views of the read buffer
        if self.compute == "gpu":
            dev = self._to_gpu(s, data)
            if view:
                return self.pack.decode(g, dev, self.dtype)
            out = self._outputs(s, g, "gpu")
            self.pack.decode(g, dev, self.dtype, out)
            tier, n = s.held.pop(len(s.held) - len(out) - 1)  # the raw bytes on the device, decoded now
            self.acc.release(tier, n, "staging")
            del dev
            return out
        return self.pack.decode(g, data, self.dtype, self._host_outputs(s, g))

    def _outputs(self, s: Staged, g: str, tier: str) -> dict:
        out = {}
        dev = self.store.device.torch_device if tier == "gpu" else torch.device("cpu")
        for n, e in self.pack.extents[g]["tensors"].items():
            t = out[n] = torch.empty(e["shape"], dtype=self.dtype, device=dev)
            self._hold(s, tier, t.nbytes)
        return out

    def _host_outputs(self, s: Staged, g: str) -> dict:
        """Compute-dtype host tensors for group g's decoded weights: views of one buffer from the pool that
        read buffers come from (the same sizes every token), not fresh tensors, whose churn would grow the
        heap past what the accountant holds (see runtime/buffers.py)."""
        entries = self.pack.extents[g]["tensors"]
        item = self.dtype.itemsize
        offsets, end = [], 0
        for e in entries.values():
            offsets.append(end)
            end += prod(e["shape"]) * item  # exactly the group's compute-dtype bytes, as staging_bytes counts
        buf = (self.buffers if s.reserved else self.expert_buffers).take(end)
        s.decoded.append(buf)
        return {n: buf[o:o + prod(e["shape"]) * item].view(self.dtype).view(e["shape"])
                for (n, e), o in zip(entries.items(), offsets)}
