"""A paged KV cache: fixed-size blocks per layer, each with a home tier (gpu | cpu | disk).

The first SINK_BLOCKS blocks (attention sinks) and the last RECENT_BLOCKS (the recent window, the
block being filled included) always live on the compute device. A block leaving the recent window
stays there while the compute tier's KV budget has room, else moves to RAM (when computing on a gpu)
and then to disk. Every tier's arena is reserved with the accountant when the first token arrives,
sized from the KV budget per tier, so the budget is never exceeded mid-sequence.

Exact attention attends block group by block group (the resident arena in place, RAM blocks staged
to the device, disk blocks read into a staging buffer) and merges the pieces with log-sum-exp, so it
equals attention over a contiguous cache (to float rounding).

Disk blocks are read with os.preadv (no flash reader exists yet in hetero/flash or native/).
Shape legend: B batch, H query heads, K kv heads, T new tokens, D head dim, N slots*block tokens.
"""

import heapq
import math
import os
import tempfile
from dataclasses import dataclass

import torch

from ..errors import HeteroError
from ..sizes import format_size
from .attention import Accumulator, causal_mask, partial_attention
from .cache import dense_attention

BLOCK_TOKENS = 64
SINK_BLOCKS = 1  # StreamingLLM: the first tokens soak up attention mass; keep them resident
RECENT_BLOCKS = 4  # the recent window on the compute device, the block being filled included
STAGE_BLOCKS = 16  # off-device blocks brought to the compute device per step
EMPTY = 2**62  # position of an unused token slot: later than any query, so causal masking hides it
SCORE_BYTES = 64 * 2**20  # cap on one [B, H, T, S] float32 score tensor: long prefills go in query chunks


@dataclass
class Block:
    tier: str  # "gpu" | "cpu" | "disk"
    slot: int  # index in that tier's arena (or the disk file)
    start: int  # position of its first token


class Arena:
    """`slots` blocks of one layer on one memory tier: k, v [B, K, slots*bs, D] and each token slot's position."""

    def __init__(self, slots: int, B: int, K: int, D: int, bs: int, dtype, device):
        # zeros, not empty: masked slots still meet the values (0 * nan = nan), so they must hold finite numbers
        self.k = torch.zeros(B, K, slots * bs, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.kpos = torch.full((slots * bs,), EMPTY, dtype=torch.long, device=device)
        self.free = list(range(slots))  # a heap: the lowest free slot first keeps the used prefix short
        self.bs, self.slots = bs, slots

    def alloc(self) -> int | None:
        return heapq.heappop(self.free) if self.free else None

    def release(self, slot: int):
        self.kpos[slot * self.bs:(slot + 1) * self.bs] = EMPTY
        heapq.heappush(self.free, slot)

    def high(self) -> int:
        """Token slots up to the last used block."""
        used = sorted(set(range(self.slots)) - set(self.free))
        return (used[-1] + 1) * self.bs if used else 0

    def span(self, slot: int):
        return slice(slot * self.bs, (slot + 1) * self.bs)


class DiskBlocks:
    """Blocks in one unlinked temporary file; a slot holds k then v, each [B, K, bs, D] contiguous."""

    def __init__(self, directory, shape: tuple, dtype: torch.dtype):
        self.file = tempfile.TemporaryFile(dir=directory, prefix="hetero-kv-")
        self.fd = self.file.fileno()
        self.shape, self.dtype = shape, dtype  # (B, K, bs, D) of k (and of v)
        self.block_bytes = 2 * math.prod(shape) * dtype.itemsize  # k and v together
        self.free: list[int] = []
        self.next = 0
        self.read_bytes = self.written_bytes = 0

    def alloc(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        self.next += 1
        return self.next - 1

    def release(self, slot: int):
        heapq.heappush(self.free, slot)

    @staticmethod
    def _views(t: torch.Tensor) -> list:
        """Byte views of each [bs, D] row run of a [B, K, bs, D] cpu tensor (each one contiguous)."""
        return [t[b, h].view(torch.uint8).numpy() for b in range(t.shape[0]) for h in range(t.shape[1])]

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor):
        n = os.pwritev(self.fd, self._views(k) + self._views(v), slot * self.block_bytes)
        if n != self.block_bytes:
            raise HeteroError(f"KV cache: short write to the disk tier ({n} of {self.block_bytes} bytes); is the disk full?")
        self.written_bytes += n

    def read(self, slot: int, k_out: torch.Tensor, v_out: torch.Tensor):
        n = os.preadv(self.fd, self._views(k_out) + self._views(v_out), slot * self.block_bytes)
        assert n == self.block_bytes, "short read from the KV block file"
        self.read_bytes += n

    def read_values(self, slot: int) -> torch.Tensor:
        """The v half [B, K, bs, D] of a block (retrieval gathers rows of the blocks it needs, one read each)."""
        v = torch.empty(self.shape, dtype=self.dtype)
        n = os.preadv(self.fd, self._views(v), slot * self.block_bytes + self.block_bytes // 2)
        assert n == self.block_bytes // 2, "short read from the KV block file"
        self.read_bytes += n
        return v

    def close(self):
        self.file.close()


class PagedLayer:
    """One decoder layer's blocks. `attend` is what models/common.py Attention calls."""

    def __init__(self, owner: "PagedKVCache", index: int):
        self.owner, self.index = owner, index
        self.blocks: list[Block] = []
        self.arenas: dict[str, Arena] = {}
        self.length = 0
        self.middle_resident = 0  # blocks outside sinks and window kept on the compute tier

    # ------------------------------------------------------------ storage

    def append(self, k, v):
        """Store new k/v [B, K, T, D] at positions length..length+T-1."""
        o = self.owner
        o.ensure(k)
        T = k.shape[2]
        if self.length + T > o.max_tokens:
            raise HeteroError(
                f"context of {self.length + T} tokens exceeds the {o.max_tokens}-token limit of this KV cache "
                "(the model's maximum or the context asked for); start a new conversation or shorten the prompt"
            )
        bs, arena, t = o.block_tokens, self.arenas[o.compute], 0
        while t < T:
            pos = self.length
            if pos % bs == 0:
                self._new_block()
            blk = self.blocks[-1]
            n = min(bs - pos % bs, T - t)
            a = blk.slot * bs + pos % bs
            arena.k[:, :, a:a + n] = k[:, :, t:t + n]
            arena.v[:, :, a:a + n] = v[:, :, t:t + n]
            arena.kpos[a:a + n] = torch.arange(pos, pos + n)
            self.length += n
            t += n

    def _new_block(self):
        o = self.owner
        i = len(self.blocks)
        leaving = i - RECENT_BLOCKS
        if leaving >= SINK_BLOCKS:
            self._demote(self.blocks[leaving])
        slot = self.arenas[o.compute].alloc()
        assert slot is not None, "compute arena has no slot for the recent window"
        self.blocks.append(Block(o.compute, slot, i * o.block_tokens))

    def _demote(self, blk: Block):
        """The block left the recent window: keep it on the compute tier if there is room, else move it down."""
        o = self.owner
        if self.middle_resident < o.middle_slots:
            self.middle_resident += 1
            return
        src = self.arenas[o.compute]
        k, v = src.k[:, :, src.span(blk.slot)], src.v[:, :, src.span(blk.slot)]  # [B, K, bs, D]
        cpu = self.arenas.get("cpu") if o.compute == "gpu" else None
        slot = cpu.alloc() if cpu is not None else None
        if slot is not None:
            cpu.k[:, :, cpu.span(slot)] = o.device.to_tier(k, "cpu")
            cpu.v[:, :, cpu.span(slot)] = o.device.to_tier(v, "cpu")
            cpu.kpos[cpu.span(slot)] = src.kpos[src.span(blk.slot)].cpu()
            tier = "cpu"
        else:
            slot = o.disk_blocks().alloc()
            o.disk.write(slot, o.device.to_tier(k, "cpu"), o.device.to_tier(v, "cpu"))
            tier = "disk"
        src.release(blk.slot)  # marks the slot free; its data stays until the next block is written
        blk.tier, blk.slot = tier, slot
        self.offloaded(blk, k, v)

    def offloaded(self, blk: Block, k: torch.Tensor, v: torch.Tensor):
        """Hook: `blk` (k, v [B, K, bs, D]) has just left the compute tier; retrieval indexes it here."""

    # ------------------------------------------------------------ attention

    def attend(self, q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
        """Attend q [B, H, T, D] to every cached token and the new ones (k, v [B, K, T, D]), then cache those.

        Returns:
            [B, H, T, D] in q's dtype.
        """
        past = self.length
        if past == 0:  # nothing stored: the same SDPA call as the contiguous cache
            self.append(k, v)
            return dense_attention(q, k, v, 0, scale, window)
        qpos = torch.arange(past, past + q.shape[2], device=q.device)
        acc = Accumulator()
        for kk, vv, kpos in self.resident_segments():
            acc.add(*chunked_attention(q, kk, vv, scale, qpos, kpos, window))
        for kk, vv, kpos in self.offloaded_segments():
            acc.add(*chunked_attention(q, kk, vv, scale, qpos, kpos, window))
        acc.add(*chunked_attention(q, k, v, scale, qpos, qpos, window))
        self.append(k, v)
        return acc.o.to(q.dtype)

    def resident_segments(self):
        """(k, v [B, K, N, D], kpos [N]) of the compute arena's used prefix (unused slots hidden by EMPTY)."""
        a = self.arenas[self.owner.compute]
        n = a.high()
        if n:
            yield a.k[:, :, :n], a.v[:, :, :n], a.kpos[:n]

    def offloaded_segments(self):
        """(k, v, kpos) of the blocks off the compute tier, STAGE_BLOCKS at a time, in the compute device's memory."""
        o = self.owner
        off = [b for b in self.blocks if b.tier != o.compute]
        bs = o.block_tokens
        for i in range(0, len(off), STAGE_BLOCKS):
            chunk = off[i:i + STAGE_BLOCKS]
            n = len(chunk) * bs
            sk, sv = o.stage_k[:, :, :n], o.stage_v[:, :, :n]
            for j, blk in enumerate(chunk):
                dst = slice(j * bs, (j + 1) * bs)
                if blk.tier == "cpu":
                    src = self.arenas["cpu"]
                    sk[:, :, dst].copy_(src.k[:, :, src.span(blk.slot)])
                    sv[:, :, dst].copy_(src.v[:, :, src.span(blk.slot)])
                elif o.device.kind == "cuda":  # through a host buffer: preadv cannot land in gpu memory
                    bk, bv = o.host_stage()
                    o.disk.read(blk.slot, bk, bv)
                    sk[:, :, dst].copy_(bk)
                    sv[:, :, dst].copy_(bv)
                else:
                    o.disk.read(blk.slot, sk[:, :, dst], sv[:, :, dst])
            kpos = torch.cat([torch.arange(b.start, b.start + bs) for b in chunk]).to(sk.device)
            yield sk, sv, kpos


def chunked_attention(q, k, v, scale, qpos, kpos, window):
    """partial_attention under the causal/window mask, in query chunks that keep the scores under SCORE_BYTES."""
    B, H, T, _ = q.shape
    step = max(1, SCORE_BYTES // max(1, 4 * B * H * k.shape[2]))
    acc_o, acc_l = [], []
    for t in range(0, T, step):
        mask = causal_mask(qpos[t:t + step], kpos, window)
        o, lse = partial_attention(q[:, :, t:t + step], k, v, scale, mask)
        acc_o.append(o)
        acc_l.append(lse)
    return torch.cat(acc_o, 2), torch.cat(acc_l, 2)


class PagedKVCache:
    """Paged KV blocks for every layer, within a KV budget per tier.

    Args:
        n_layers: decoder layers.
        compute: "gpu" or "cpu", the tier whose device computes.
        device: runtime.device.Device.
        accountant: runtime.memory.Accountant (KV arenas and staging are reserved as "kv").
        budgets: tier -> bytes of KV that tier may hold: the compute tier's, and "cpu" when computing on a gpu.
        max_tokens: the longest context accepted (the model's limit, or less).
        disk_dir: where the disk-tier block file goes (default: the system's temporary directory).
        block_tokens: tokens per block (default BLOCK_TOKENS).
    """

    layer_class = PagedLayer

    def __init__(self, n_layers: int, compute: str, device, accountant, budgets: dict, max_tokens: int,
                 disk_dir=None, block_tokens: int | None = None):
        self.compute, self.device, self.accountant = compute, device, accountant
        self.budgets, self.max_tokens, self.disk_dir = dict(budgets), max_tokens, disk_dir
        self.block_tokens = block_tokens or BLOCK_TOKENS
        self.layers = [self.layer_class(self, i) for i in range(n_layers)]
        self.reserved: dict[str, int] = {}
        self.disk = None
        self.stage_k = self.stage_v = self._host = None
        self.middle_slots = 0

    def __getitem__(self, i: int) -> PagedLayer:
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def _reserve(self, tier: str, nbytes: int):
        self.accountant.reserve(tier, nbytes, "kv")
        self.reserved[tier] = self.reserved.get(tier, 0) + nbytes

    def ensure(self, k: torch.Tensor):
        """At the first token: size every tier's arena from its budget and reserve it."""
        if self.reserved:
            return
        B, K, _, D = k.shape
        bs, L = self.block_tokens, len(self.layers)
        block = 2 * B * K * bs * D * k.element_size()  # bytes of k and v of one block
        need = math.ceil(self.max_tokens / bs)
        floor = min(need, SINK_BLOCKS + RECENT_BLOCKS)
        budget_c = self.budgets.get(self.compute) or 0
        stage = 0 if budget_c >= L * need * block else STAGE_BLOCKS * block
        cap_c = min(need, max(0, budget_c - stage) // (L * block))
        if cap_c < floor:
            least = L * floor * block + stage
            raise HeteroError(
                f"a KV budget of {format_size(budget_c)} on the {self.compute} tier cannot hold the attention sinks and "
                f"the recent window ({floor} blocks of {bs} tokens per layer); give at least {format_size(least)}"
            )
        self.middle_slots = cap_c - floor
        dev = self.device.torch_device if self.compute == "gpu" else torch.device("cpu")
        cap_cpu, host = 0, 0
        if self.compute == "gpu" and cap_c < need:
            budget_h = self.budgets.get("cpu") or 0
            rest = need - cap_c
            host = block if self.device.kind == "cuda" else 0  # the bounce buffer disk reads land in
            cap_cpu = min(rest, max(0, budget_h - host) // (L * block))
            if budget_h < host:
                raise HeteroError(f"a KV budget of {format_size(budget_h)} on the cpu tier cannot hold one "
                                  f"{format_size(block)} block to read the disk tier through; give more RAM")
        self._reserve(self.compute, L * cap_c * block + stage)
        if cap_cpu or host:
            self._reserve("cpu", L * cap_cpu * block + host)
        for layer in self.layers:
            layer.arenas[self.compute] = Arena(cap_c, B, K, D, bs, k.dtype, dev)
            if cap_cpu:
                layer.arenas["cpu"] = Arena(cap_cpu, B, K, D, bs, k.dtype, torch.device("cpu"))
        if stage:
            self.stage_k = torch.zeros(B, K, STAGE_BLOCKS * bs, D, dtype=k.dtype, device=dev)  # finite, as in Arena
            self.stage_v = torch.zeros_like(self.stage_k)
        self._shape = (B, K, bs, D, k.dtype, block)

    def disk_blocks(self) -> DiskBlocks:
        if self.disk is None:
            B, K, bs, D, dtype, _ = self._shape
            self.disk = DiskBlocks(self.disk_dir, (B, K, bs, D), dtype)
        return self.disk

    def host_stage(self):
        """A one-block host buffer (k, v [B, K, bs, D]) that disk reads land in on the way to a cuda device."""
        if self._host is None:
            B, K, bs, D, dtype, _ = self._shape
            self._host = (torch.zeros(B, K, bs, D, dtype=dtype), torch.zeros(B, K, bs, D, dtype=dtype))
        return self._host

    def tier_blocks(self) -> dict[str, int]:
        """Blocks per home tier over all layers."""
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for layer in self.layers:
            for b in layer.blocks:
                out[b.tier] += 1
        return out

    def free(self):
        """Drop every block and give the reserved bytes back."""
        for tier, n in self.reserved.items():
            self.accountant.release(tier, n, "kv")
        self.reserved = {}
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        self.stage_k = self.stage_v = self._host = None
        for i, layer in enumerate(self.layers):
            self.layers[i] = self.layer_class(self, i)
