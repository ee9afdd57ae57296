"""Retrieval attention: decode queries attend exactly to the resident blocks and to their top-k keys
among the blocks off the compute device, found through a per-KV-head index; the two parts are merged
with log-sum-exp.

    resident (sinks, recent window, blocks the KV budget keeps on the device) -> exact, (o_r, lse_r)
    off-device blocks -> index.search(the G query heads of each KV head, in one batch) -> top-k ids
                      -> gather their K (from the index) and V (from RAM or disk) -> (o_t, lse_t)
    o = merge(o_r, lse_r, o_t, lse_t)

Prefill stays exact (it needs every key anyway) and feeds the index a sample of its real queries,
which is what the query-aware index (ann.QueryRoutedIndex, chosen by the measurements in
benchmarks/long_context.py) is built from. With top-k at least the number of off-device keys the
result equals exact attention.

Shape legend: B batch, H query heads, K kv heads, G = H // K, D head dim, k retrieved keys per query head.
"""

import numpy as np
import torch

from .ann import QueryRoutedIndex
from .attention import Accumulator, partial_attention_gathered
from .paged import PagedKVCache, PagedLayer, chunked_attention

TOP_K = 100  # keys retrieved per query head and decode step
LEARN_PER_CALL = 1024  # prefill queries offered to each KV head's index per call (a uniform sample)


def make_index(dim: int):
    """The index used for off-device keys: the query-aware one (best recall per key scanned as measured)."""
    return QueryRoutedIndex(dim, clusters=32, links=128, nprobe=4, max_queries=1024)


class RetrievalLayer(PagedLayer):
    def __init__(self, owner, index):
        super().__init__(owner, index)
        self.indexes = None  # [B * K] ann indexes, one per (sequence, kv head)
        self.pos: list[int] = []  # position of each indexed key (ids are given in the order added)
        self.index_bytes = 0

    def _indexes(self, B: int, K: int, D: int):
        if self.indexes is None:
            self.indexes = [self.owner.make_index(D) for _ in range(B * K)]
        return self.indexes

    def _account(self):
        now = sum(ix.nbytes() for ix in self.indexes)
        if now > self.index_bytes:
            self.owner.reserve_index(now - self.index_bytes)
            self.index_bytes = now

    def offloaded(self, blk, k):
        B, K, bs, D = k.shape
        keys = k.float().cpu().numpy()
        for i, ix in enumerate(self._indexes(B, K, D)):
            ix.add(keys[i // K, i % K])
        self.pos.extend(range(blk.start, blk.start + bs))
        self._account()

    def attend(self, q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
        B, H, T, D = q.shape
        K = k.shape[1]
        G = H // K
        if T > 1 or not self.pos:
            if T > 1:
                self._learn(q, K)
            return super().attend(q, k, v, scale, window)
        qpos = torch.arange(self.length, self.length + 1, device=q.device)
        acc = Accumulator()
        for kk, vv, kpos in self.resident_segments():
            acc.add(*chunked_attention(q, kk, vv, scale, qpos, kpos, window))
        acc.add(*chunked_attention(q, k, v, scale, qpos, qpos, window))
        kt, vt, valid = self._retrieve(q, K, G, window)
        acc.add(*partial_attention_gathered(q, kt, vt, scale, valid))
        self._account()
        self.append(k, v)
        return acc.o.to(q.dtype)

    def _learn(self, q, K: int):
        B, H, T, D = q.shape
        G = H // K
        qs = q.float().cpu().reshape(B, K, G * T, D).numpy()  # [B, K, G*T, D]: a group's heads side by side
        rng = self.owner.rng
        for i, ix in enumerate(self._indexes(B, K, D)):
            rows = qs[i // K, i % K]
            if len(rows) > LEARN_PER_CALL:
                rows = rows[np.sort(rng.choice(len(rows), LEARN_PER_CALL, replace=False))]
            ix.learn(rows)

    def _retrieve(self, q, K: int, G: int, window):
        """Top-k keys per query head among the off-device ones: (k, v [B, H, k, D], valid [B, H, k])."""
        B, H, _, D = q.shape
        o = self.owner
        topk = min(o.top_k, len(self.pos))
        qs = q[:, :, 0].float().cpu().reshape(B, K, G, D).numpy()
        ids = np.empty((B, K, G, topk), np.int64)
        for i, ix in enumerate(self.indexes):
            found, scanned = ix.search(qs[i // K, i % K], topk)  # the G heads of one group in one batch
            ids[i // K, i % K] = found
            o.scanned += scanned * G
            o.searched += ix.ntotal * G
        ids = ids.reshape(B, H, topk)
        valid = ids >= 0
        ids = np.where(valid, ids, 0)
        kt = np.empty((B, H, topk, D), np.float32)
        for b in range(B):
            for h in range(H):
                kt[b, h] = self.indexes[b * K + h // G].keys[ids[b, h]]
        pos = np.asarray(self.pos)[ids]  # [B, H, k]
        if window is not None:
            valid &= pos > self.length - window
        vt = self._gather_values(pos, K, G, q.dtype)
        dev = q.device
        return torch.from_numpy(kt).to(dev), vt.to(dev), torch.from_numpy(valid).to(dev)

    def _gather_values(self, pos: np.ndarray, K: int, G: int, dtype) -> torch.Tensor:
        """V rows [B, H, k, D] of the tokens at `pos` [B, H, k], from their blocks' home tiers."""
        o = self.owner
        bs = o.block_tokens
        B, H, n = pos.shape
        out = torch.empty(B, H, n, o._shape[3], dtype=dtype)
        tier_of = np.array([b.tier for b in self.blocks])[pos // bs]  # [B, H, k]
        row = np.array([b.slot for b in self.blocks])[pos // bs] * bs + pos % bs  # token slot in its arena / block
        bb = np.broadcast_to(np.arange(B)[:, None, None], pos.shape)
        kh = np.broadcast_to((np.arange(H) // G)[None, :, None], pos.shape)
        for tier, arena in self.arenas.items():
            m = tier_of == tier
            if m.any():
                idx = [torch.from_numpy(np.ascontiguousarray(x[m])).to(arena.v.device) for x in (bb, kh, row)]
                out[torch.from_numpy(m)] = arena.v[idx[0], idx[1], idx[2]].cpu()
        for b, h, j in zip(*np.nonzero(tier_of == "disk")):
            out[b, h, j] = o.disk.read_row(row[b, h, j] // bs, "v", b, kh[b, h, j], row[b, h, j] % bs)
        return out


class RetrievalKVCache(PagedKVCache):
    """A PagedKVCache whose decode steps use retrieval attention for the blocks off the compute device.

    Args: those of PagedKVCache, and
        top_k: keys retrieved per query head per decode step.
        index: a callable(dim) -> ann index (default make_index).
    """

    layer_class = RetrievalLayer

    def __init__(self, *args, top_k: int | None = None, index=None, **kw):
        super().__init__(*args, **kw)
        self.top_k = top_k or TOP_K
        self.make_index = index or make_index
        self.rng = np.random.default_rng(0)
        self.scanned = self.searched = 0  # keys scanned / keys searched over, summed over searches
        self.index_reserved = 0

    def reserve_index(self, nbytes: int):
        self.accountant.reserve("cpu", nbytes, "kv_index")
        self.index_reserved += nbytes

    def scanned_fraction(self) -> float | None:
        return self.scanned / self.searched if self.searched else None

    def free(self):
        super().free()
        if self.index_reserved:
            self.accountant.release("cpu", self.index_reserved, "kv_index")
            self.index_reserved = 0
