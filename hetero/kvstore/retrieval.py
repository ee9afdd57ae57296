"""Retrieval attention: decode queries attend exactly to the resident blocks and to their top-k keys
among the blocks off the compute device, found through a per-KV-head index; the two parts are merged
with log-sum-exp.

    resident (sinks, recent window, blocks the KV budget keeps on the device) -> exact, (o_r, lse_r)
    off-device blocks -> index.search(every KV head in one call; a group's G query heads share candidates) -> top-k ids
                      -> gather their K (from the index) and V (from RAM or disk) -> (o_t, lse_t)
    o = merge(o_r, lse_r, o_t, lse_t)

Prefill stays exact (it needs every key anyway) and feeds the index its real queries: the
query-aware index (qivf.WhitenedIVF, chosen by the measurements in benchmarks/long_context.py)
clusters keys in the space whitened by the queries' second moment. With top-k at least the number
of off-device keys the result equals exact attention.

Shape legend: B batch, H query heads, K kv heads, G = H // K, D head dim, k retrieved keys per query head.
"""

import numpy as np
import torch

from .attention import Accumulator, partial_attention_gathered
from .paged import PagedKVCache, PagedLayer, chunked_attention
from .qivf import WhitenedIVF

TOP_K = 200  # keys retrieved per query head and decode step (output cosine p5 0.990 at 100, 0.995 at 200)
SCAN = 0.3  # share of off-device keys each group scores exactly: recall@100 0.96 on SmolLM2 at 8K (long_context.py)
MAX_SCAN = 4096  # ... but no more keys than this per group, so a search costs the same at 32K as at 128K


def make_index(heads: int, dim: int):
    """The index of one layer's off-device keys, `heads` = sequences x kv heads searched in one call."""
    return WhitenedIVF(heads, dim, scan=SCAN, max_scan=MAX_SCAN)


class RetrievalLayer(PagedLayer):
    def __init__(self, owner, index):
        super().__init__(owner, index)
        self.ann = None  # one index for the layer: [B * K] key sets
        self.pos: list[int] = []  # position of each indexed key (ids are given in the order added)
        self.index_bytes = 0

    def _index(self, B: int, K: int, D: int):
        if self.ann is None:
            self.ann = self.owner.make_index(B * K, D)
        return self.ann

    def _account(self):
        now = self.ann.nbytes()
        if now > self.index_bytes:
            self.owner.reserve_index(now - self.index_bytes)
            self.index_bytes = now

    def offloaded(self, blk, k):
        B, K, bs, D = k.shape
        self._index(B, K, D).add(k.float().cpu().reshape(B * K, bs, D).numpy())
        self.pos.extend(range(blk.start, blk.start + bs))
        self._account()

    def attend(self, q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
        B, H, T, D = q.shape
        K = k.shape[1]
        G = H // K
        if T > 1 or not self.pos:
            if T > 1:
                # the second moment of every prefill query (D x D per kv head), before this chunk's keys are indexed
                self._index(B, K, D).learn(q.float().cpu().reshape(B * K, G * T, D).numpy())
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

    def _retrieve(self, q, K: int, G: int, window):
        """Top-k keys per query head among the off-device ones: (k, v [B, H, k, D], valid [B, H, k])."""
        B, H, _, D = q.shape
        o, ix = self.owner, self.ann
        topk = min(o.top_k, len(self.pos))
        ids, scanned = ix.search(q[:, :, 0].float().cpu().reshape(B * K, G, D).numpy(), topk)  # [B*K, G, k]
        o.scanned += float(scanned.sum())
        o.searched += ix.ntotal * B * K
        valid = ids >= 0
        ids = np.where(valid, ids, 0)
        kt = ix.keys[np.arange(B * K)[:, None, None], ids].reshape(B, H, topk, D)  # from the index's own copy
        ids, valid = ids.reshape(B, H, topk), valid.reshape(B, H, topk)
        pos = np.asarray(self.pos)[ids]  # [B, H, k]
        if window is not None:
            valid &= pos > self.length - window
        vt = self._gather_values(pos, K, G, q.dtype)
        dev = q.device
        return torch.from_numpy(kt).to(dev, q.dtype), vt.to(dev), torch.from_numpy(valid).to(dev)

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
        index: a callable(heads, dim) -> index of a layer's off-device keys (default make_index).
    """

    layer_class = RetrievalLayer

    def __init__(self, *args, top_k: int | None = None, index=None, **kw):
        super().__init__(*args, **kw)
        self.top_k = top_k or TOP_K
        self.make_index = index or make_index
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
