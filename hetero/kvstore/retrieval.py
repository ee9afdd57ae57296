"""Retrieval attention: decode queries attend exactly to the resident blocks and to the keys a
per-KV-head index finds for them among the blocks off the compute device; the two parts are merged
with log-sum-exp.

    resident (sinks, recent window, blocks the KV budget keeps on the device) -> exact, (o_r, lse_r)
    off-device blocks -> index.candidates(every KV head in one call; a group's G query heads share them)
                      -> their K (the index's copy), scored exactly
                      -> their V: exact from RAM; from disk, exact for each head's best TOP_K, the
                         4-bit copy (int4rows.Int4Rows) for the rest -> (o_t, lse_t)
                      -> the clusters it did not probe, each as its size x exp(mean score) x mean
                         value (a lower bound of their mass, qivf._rest) -> (o_u, lse_u)
    o = merge(o_r, lse_r, o_t, lse_t, o_u, lse_u)

The index scores every candidate exactly anyway, so attending to all of them, not only each head's
best top_k, drops far less of the softmax mass: flat heads spread theirs past any top-200. Past the
top_k, V rows on disk come from the 4-bit copy kept in RAM beside the index, as a disk read per row
would cost more than the row is worth (benchmarks/long_context.py measures the output cosines and
the end-to-end agreement of both paths; `top_k=` on the cache keeps the top-k-only path).

Prefill stays exact (it needs every key anyway) and feeds the index its real queries: the
query-aware index (qivf.WhitenedIVF, chosen by the measurements in benchmarks/long_context.py)
clusters keys in the space whitened by the queries' second moment. Scanning every key, with V in
memory or TOP_K past the number of off-device keys, the result equals exact attention.

Shape legend: B batch, H query heads, K kv heads, G = H // K, D head dim, k retrieved keys per query
head, C candidates per KV head.
"""

import numpy as np
import torch

from .attention import Accumulator, merge, partial_attention_gathered
from .int4rows import Int4Rows
from .paged import PagedKVCache, PagedLayer, chunked_attention
from .qivf import WhitenedIVF

TOP_K = 200  # per query head and step, the scanned keys whose V is read exact from disk (the rest: 4-bit)
# share of off-device keys each group scores exactly. On SmolLM2 at 8K, 256 teacher-forced steps
# (long_context.py --agreement-only --decode 256 --scans 0.3,0.45,0.5,0.6), the next token agreed with exact
# attention's 96.1% / 99.2% / 99.6% / 99.2% of the time, KL 0.0044 / 0.0011 / 0.0004 / 0.0002 (the
# disagreements at 0.5 and 0.6 are near ties): the flat heads' mass left unscanned made the difference
SCAN = 0.5
MAX_SCAN = 4096  # ... but no more keys than this per group, so a search costs the same at 32K as at 128K
REST = True  # attend to the unprobed clusters too, each as its size x exp(mean score) x mean value (qivf._rest)
TIER_CODES = {"gpu": 0, "cpu": 1, "disk": 2}
DISK = TIER_CODES["disk"]


def make_index(heads: int, dim: int):
    """The index of one layer's off-device keys, `heads` = sequences x kv heads searched in one call."""
    return WhitenedIVF(heads, dim, scan=SCAN, max_scan=MAX_SCAN)


class RetrievalLayer(PagedLayer):
    def __init__(self, owner, index):
        super().__init__(owner, index)
        self.ann = None  # one index for the layer: [B * K] key sets
        self._pos = np.empty(0, np.int64)  # position of each indexed key (ids are given in the order added)
        self.indexed = 0
        self.low = None  # Int4Rows: the 4-bit V copy of the indexed keys, same ids
        self._table = self._table_key = None
        self.index_bytes = 0

    @property
    def pos(self) -> np.ndarray:
        return self._pos[:self.indexed]

    def _block_table(self):
        """(tier code [blocks] int8 (TIER_CODES), slot [blocks] int64) of this layer's blocks: a decode step
        looks rows up in them, so they are rebuilt only when a block is added or leaves the compute tier."""
        key = (len(self.blocks), self.indexed)
        if self._table_key != key:
            self._table = (np.array([TIER_CODES[b.tier] for b in self.blocks], np.int8),
                           np.array([b.slot for b in self.blocks], np.int64))
            self._table_key = key
        return self._table

    def _index(self, B: int, K: int, D: int):
        if self.ann is None:
            self.ann = self.owner.make_index(B * K, D)
            if hasattr(self.ann, "value_rows"):  # per-cluster value sums from the 4-bit copy, for the rest estimate
                self.ann.value_rows = lambda head, ids: self.low.rows(head, ids)
        return self.ann

    def _account(self):
        now = self.ann.nbytes() + self.low.nbytes()
        if now > self.index_bytes:
            self.owner.reserve_index(now - self.index_bytes)
            self.index_bytes = now

    def offloaded(self, blk, k, v):
        B, K, bs, D = k.shape
        if self.low is None:
            self.low = Int4Rows(B * K, v.shape[3])
        vv = v.cpu().reshape(B * K, bs, v.shape[3])
        self.low.add(vv)  # first: the index reads its clusters' value sums from it
        self._index(B, K, D).add(k.float().cpu().reshape(B * K, bs, D).numpy())
        if self.indexed + bs > len(self._pos):  # grown by doubling: a step reads it, never copies it
            self._pos = np.concatenate([self._pos[:self.indexed], np.empty(max(len(self._pos), bs, 1024), np.int64)])
        self._pos[self.indexed:self.indexed + bs] = np.arange(blk.start, blk.start + bs)
        self.indexed += bs
        self._account()

    def attend(self, q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
        B, H, T, D = q.shape
        K = k.shape[1]
        G = H // K
        if T > 1 or not self.indexed:
            if T > 1:
                # the second moment of every prefill query (D x D per kv head), before this chunk's keys are indexed
                self._index(B, K, D).learn(q.float().cpu().reshape(B * K, G * T, D).numpy())
            return super().attend(q, k, v, scale, window)
        qpos = torch.arange(self.length, self.length + 1, device=q.device)
        acc = Accumulator()
        for kk, vv, kpos in self.resident_segments():
            acc.add(*chunked_attention(q, kk, vv, scale, qpos, kpos, window))
        acc.add(*chunked_attention(q, k, v, scale, qpos, qpos, window))
        if self.owner.top_k is None:
            o, lse = self._attend_scanned(q, K, G, scale, window)
            acc.add(o.to(q.device), lse.to(q.device))
        else:
            kt, vt, valid = self._retrieve(q, K, G, window)
            acc.add(*partial_attention_gathered(q, kt, vt, scale, valid))
        self._account()
        self.append(k, v)
        return acc.o.to(q.dtype)

    def _attend_scanned(self, q, K: int, G: int, scale: float, window):
        """Attention (o [B, H, 1, D], lse [B, H, 1], float32 on the cpu) over every off-device key the
        index scans for a group: V exact where its block is in memory, and on disk for the best TOP_K
        of each query head; the 4-bit copy for the rest of the disk rows."""
        B, H, _, D = q.shape
        o, ix = self.owner, self.ann
        qg = q[:, :, 0].float().cpu().reshape(B * K, G, D)
        rest = REST and window is None  # the unprobed clusters' estimate covers every position: not windows
        found = ix.candidates(qg.numpy(), rest=True) if rest else ix.candidates(qg.numpy())
        cand, valid, keys, scanned = found[:4]  # [BK, C] x2, [BK, C, D]
        o.scanned += float(scanned.sum())
        o.searched += ix.ntotal * B * K
        pos = self.pos[cand]  # [BK, C]
        if window is not None:
            valid &= pos > self.length - window
        s = torch.bmm(qg, keys.transpose(1, 2)) * scale  # [BK, G, C]
        s.masked_fill_(~torch.from_numpy(valid)[:, None, :], float("-inf"))
        lse = torch.logsumexp(s, -1)  # [BK, G]
        p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])  # a head with no key: 0
        tiers = self._block_table()[0][pos // o.block_tokens]  # [BK, C] tier codes
        bk = np.repeat(np.arange(B * K), cand.shape[1])  # [BK * C] sequence x kv head of each candidate
        on_disk = tiers == DISK
        if not on_disk.any():  # every V row in memory: all exact, one gather
            vals = self._values_at(bk // K, bk % K, pos.ravel(), tiers.ravel()).float()
        else:
            exact = ~on_disk
            best = torch.topk(s, min(TOP_K, s.shape[2]), dim=2).indices.numpy()  # [BK, G, k]
            exact[np.arange(B * K)[:, None, None], best] = True  # a row any head of the group ranks high
            exact &= valid
            vals = self.low.gather(cand).view(-1, D)  # [BK * C, D]
            at = np.flatnonzero(exact)
            rows = self._values_at(bk[at] // K, bk[at] % K, pos.ravel()[at], tiers.ravel()[at]).float()
            vals.index_copy_(0, torch.from_numpy(at), rows)
        out = torch.bmm(p, vals.view(B * K, -1, D))  # [BK, G, D]
        if rest:
            out, lse = merge(out, lse, *found[4])
        return out.reshape(B, H, 1, D), lse.reshape(B, H, 1)

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
        pos = self.pos[ids]  # [B, H, k]
        if window is not None:
            valid &= pos > self.length - window
        vt = self._gather_values(pos, K, G, q.dtype)
        dev = q.device
        return torch.from_numpy(kt).to(dev, q.dtype), vt.to(dev), torch.from_numpy(valid).to(dev)

    def _gather_values(self, pos: np.ndarray, K: int, G: int, dtype) -> torch.Tensor:
        """V rows [B, H, k, D] of the tokens at `pos` [B, H, k], from their blocks' home tiers."""
        B, H, n = pos.shape
        bb = np.broadcast_to(np.arange(B)[:, None, None], pos.shape)
        kh = np.broadcast_to((np.arange(H) // G)[None, :, None], pos.shape)
        return self._values_at(bb.ravel(), kh.ravel(), pos.ravel()).to(dtype).view(B, H, n, -1)

    def _values_at(self, b: np.ndarray, kh: np.ndarray, pos: np.ndarray, tiers: np.ndarray | None = None) -> torch.Tensor:
        """V rows [N, D] (cache dtype, cpu) of sequence b[i], kv head kh[i], position pos[i] (tier codes
        of their blocks: `tiers`, looked up when not given)."""
        o = self.owner
        bs = o.block_tokens
        codes, slots = self._block_table()
        tier_of = codes[pos // bs] if tiers is None else tiers  # [N]
        row = slots[pos // bs] * bs + pos % bs  # token slot in its arena / block
        out = None
        for tier, arena in self.arenas.items():
            m = tier_of == TIER_CODES[tier]
            if not m.any():
                continue
            # one index_select on the flattened arena [B * K * slots * bs, D]: far faster than a 3-d gather
            flat = ((b * arena.v.shape[1] + kh) * arena.v.shape[2] + row)
            if m.all():
                return arena.v.view(-1, arena.v.shape[3]).index_select(
                    0, torch.from_numpy(flat).to(arena.v.device)).cpu()
            if out is None:
                out = torch.empty(len(pos), o._shape[3], dtype=o._shape[4])
            at = np.flatnonzero(m)
            rows = arena.v.view(-1, arena.v.shape[3]).index_select(0, torch.from_numpy(flat[at]).to(arena.v.device))
            out.index_copy_(0, torch.from_numpy(at), rows.cpu())
        if out is None:
            out = torch.empty(len(pos), o._shape[3], dtype=o._shape[4])
        disk = np.flatnonzero(tier_of == DISK)
        disk_slots = row[disk] // bs
        for slot in np.unique(disk_slots):  # one read per block, not per row: rows of a block come together
            at = disk[disk_slots == slot]
            v = o.disk.read_values(int(slot))  # [B, K, bs, D]
            out[torch.from_numpy(at)] = v[torch.from_numpy(b[at]), torch.from_numpy(kh[at]), torch.from_numpy(row[at] % bs)]
        return out


class RetrievalKVCache(PagedKVCache):
    """A PagedKVCache whose decode steps use retrieval attention for the blocks off the compute device.

    Args: those of PagedKVCache, and
        top_k: None (the default): attend to every key the index scans (each group's probed clusters,
            scored exactly anyway), V from disk exact only for each head's best TOP_K (see above);
            an int: to the best top_k of them per query head only, every V row exact.
        index: a callable(heads, dim) -> index of a layer's off-device keys (default make_index).
    """

    layer_class = RetrievalLayer

    def __init__(self, *args, top_k: int | None = None, index=None, **kw):
        super().__init__(*args, **kw)
        self.top_k = top_k
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
