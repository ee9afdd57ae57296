"""The query-aware index retrieval attention uses: IVF over keys in the space the queries see them in.

A query q scores a key k by q·k. Clustering keys by plain distance treats every direction alike,
but queries and keys come from different projections (RetrievalAttention, section 3): the score
error of replacing k by its centroid c, averaged over the queries, is
    E_q[(q·(k - c))²] = (k - c)ᵀ C (k - c) = ‖A k - A c‖²,   C = E[q qᵀ], A = C^½,
so k-means on the whitened keys A k is the clustering that minimises the score error under the
query distribution, and q·k = (A⁻¹ q)·(A k) keeps the scores exact. C is learned from the real
queries of the prefill (a running sum, D×D per head).

Search is batched over every (sequence, kv head) of a layer and the G query heads of each group
share one candidate set. Clusters are ranked by the softmax weight their keys are expected to get,
best over the group's heads: with a cluster's per-dimension key mean μ and variance σ² (kept as
running sums), log E[exp(scale q·k)] ≈ scale q·μ + scale²/2 Σ q² σ², so a spread cluster whose tail
reaches high scores ranks above a tight one of equal mean (long_context.py measures the attention
output cosines this gives). Clusters are taken until `scan` × n keys are gathered; those keys are
scored exactly. With the owner's values (value_rows), each cluster also keeps its value sum, and a
search can return an estimate of the attention the clusters it did not probe hold (_rest). No
Python loop runs per head or per cluster at search time.

Keys are added in blocks; each new key joins its nearest centroid. The clustering is re-trained
when the keys have doubled since the last training (amortised O(1) per key).

Shape legend: h index heads (sequences × kv heads), n keys per head, G query heads per search,
D head dim, c clusters, C candidates per head (padded).
"""

import faiss
import numpy as np
import torch

MIN_BUILD = 256  # below this many keys per head a scan of all of them is as cheap as any index
SPLIT = 2  # a cluster that grows past SPLIT x cluster_size is split
# ... checked after every block while searches run (a decode), but during a prefill, which adds block
# after block and searches none, once SPLIT_BATCHES-th of the keys (at least SPLIT_BATCH_MIN) have been
# added since the last check, and before the first search: a 128K-token layer splits in ~20 batches,
# not ~2000 times, each of which re-grew the per-cluster arrays (a one-layer 128K fill: 15 s -> 8 s)
SPLIT_BATCHES, SPLIT_BATCH_MIN = 16, 1024
EMPTY_CENTROID = 1e6  # padding centroid: no key is near it; empty clusters cost a centroid score, no keys


def _bmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched a [h, x, y] @ b [h, y, z] in float32 (torch's bmm: numpy's stacked matmul is far slower here)."""
    # np.require copies only what is not already C-contiguous, writable float32 (torch wants writable memory)
    return torch.bmm(torch.from_numpy(np.require(a, np.float32, ["C", "W"])),
                     torch.from_numpy(np.require(b, np.float32, ["C", "W"]))).numpy()


def _sqrtm(C: np.ndarray, inverse: bool) -> np.ndarray:
    """Symmetric C^½ (or C^-½) of a PSD matrix [D, D], tiny eigenvalues clamped."""
    w, V = np.linalg.eigh(C.astype(np.float64))
    w = np.maximum(w, 1e-6 * max(w.max(), 1e-30))
    return ((V * w ** (-0.5 if inverse else 0.5)) @ V.T).astype(np.float32)


class WhitenedIVF:
    """IVF over query-whitened keys for `heads` heads at once (see the module docstring).

    Args:
        heads: independent key sets (e.g. batch × kv heads), searched in one call.
        dim: head dim D.
        cluster_size: keys per cluster aimed at (clusters = n // cluster_size at training).
        scan: share of each head's keys gathered and scored exactly per search (plus the cluster ranking) ...
        max_scan: ... but at most this many keys, so a search's cost stops growing with the context.
        whiten: False clusters the raw keys (the "keys only" baseline of the benchmark).
        scale: the attention's score scale (default D^-½), for the spread term of the cluster ranking.
    """

    def __init__(self, heads: int, dim: int, cluster_size: int = 64, scan: float = 0.3, max_scan: int | None = None,
                 whiten: bool = True, seed: int = 1, scale: float | None = None):
        self.h, self.dim, self.cluster_size, self.scan, self.whiten = heads, dim, cluster_size, scan, whiten
        self.scale = dim ** -0.5 if scale is None else scale
        self.max_scan = max_scan
        self.seed = seed
        self.keys = np.empty((heads, 0, dim), np.float32)  # [h, capacity, D]; ids are the order added
        self.n = 0
        self.qsum = np.zeros((heads, dim, dim), np.float64)  # Σ q qᵀ of the learned queries
        self.qcount = 0
        self.trained_at = 0  # n when the clusters were last trained (0: not trained)
        self.unsplit = 0  # keys added since the clusters were last checked for splits
        self.A = self.Ainv = self.centroids = None  # [h, D, D] x2, [h, c, D]
        self.assign = np.empty((heads, 0), np.int32)  # [h, n] cluster of each key
        self.counts = None  # [h, c] keys per cluster, kept with assign
        self.logn = None  # [h, c] float32 log(max(counts, 1)), from the last sort or insert
        self._near = None  # (|centroid|² [h, 1, c], centroidsᵀ [h, D, c]) for _nearest, until the centroids change
        self.order = self.starts = None  # [h, n] key ids sorted by cluster, [h, c + 1] cluster offsets
        self.m1 = self.m2 = None  # [h, c, D] float32: Σ k and Σ k² of each cluster's keys (raw, per dim)
        self.mean = self.var = None  # [h, D, c] float32, from m1, m2 at the last sort
        # the owner's copy of the values, callable(head, ids [N]) -> [N, Dv] float32 tensor: when set, each
        # cluster keeps the sum of its keys' values (v1 [h, c, Dv]) and a search can estimate the part of
        # the attention its unprobed clusters hold (candidates(rest=True))
        self.value_rows = None
        self.v1 = None

    @property
    def ntotal(self) -> int:
        return self.n

    def learn(self, queries: np.ndarray):
        """Fold real queries [h, m, D] into the query second moment (used at the next training)."""
        q = np.asarray(queries, np.float64)
        self.qsum += np.einsum("hmd,hme->hde", q, q)
        self.qcount += q.shape[1]

    def add(self, keys: np.ndarray):
        """Append keys [h, b, D]; they get ids n, n+1, ... in every head. With value_rows set, the owner's
        copy must hold their values already (the clusters' value sums read them from it)."""
        keys = np.asarray(keys, np.float32)
        b = keys.shape[1]
        if self.n + b > self.keys.shape[1]:
            bigger = np.empty((self.h, max(2 * self.keys.shape[1], self.n + b, 1024), self.dim), np.float32)
            bigger[:, :self.n] = self.keys[:, :self.n]
            self.keys = bigger
        self.keys[:, self.n:self.n + b] = keys
        self.n += b
        if self.trained_at:
            new = self._nearest(keys)  # [h, b]
            self.assign = np.concatenate([self.assign, new], axis=1)
            added = self._count(new)  # [h, c]
            self.counts += added
            heads = np.repeat(np.arange(self.h), b)
            self._moments(heads, new.ravel(), keys.reshape(-1, self.dim))
            if self.v1 is not None:  # from the owner's copy, as splits take them away: the sums stay consistent
                for i in range(self.h):
                    self._value_sums(np.full(b, i), new[i], self.value_rows(i, np.arange(self.n - b, self.n)))
            self.unsplit += b
            if self.order is None:  # a prefill adds many blocks and searches none: split in batches, sort at the search
                if self.unsplit >= max(SPLIT_BATCH_MIN, self.n // SPLIT_BATCHES):
                    self._split()
            elif self._split():
                self.order = None
            else:  # a decode step's block: slot its keys into the sorted order, O(n) and no sort
                self._insert(new, added)
        elif self.n >= MIN_BUILD:
            self.train()

    def train(self):
        """(Re)cluster every head's whitened keys; k-means runs per head (only here, never in a search)."""
        n, D = self.n, self.dim
        c = max(1, n // self.cluster_size)
        if self.whiten and self.qcount:
            C = self.qsum / self.qcount
            self.A = np.stack([_sqrtm(C[i], False) for i in range(self.h)])
            self.Ainv = np.stack([_sqrtm(C[i], True) for i in range(self.h)])
        else:
            self.A = self.Ainv = np.broadcast_to(np.eye(D, dtype=np.float32), (self.h, D, D))
        kw = _bmm(self.keys[:, :n], self.A)  # [h, n, D] (A is symmetric)
        cents = []
        for i in range(self.h):
            km = faiss.Kmeans(D, c, niter=10, seed=self.seed, min_points_per_centroid=1, max_points_per_centroid=64)
            km.train(np.ascontiguousarray(kw[i]))
            cents.append(km.centroids)
        self.centroids = np.stack(cents).astype(np.float32)
        self._near = None
        self.assign = self._nearest(self.keys[:, :n])
        self.counts = self._count(self.assign)
        self.m1 = self.m2 = None
        for i in range(self.h):
            self._moments(np.full(n, i), self.assign[i], self.keys[i, :n])
        if self.value_rows is not None:
            self.v1 = None
            for i in range(self.h):
                self._value_sums(np.full(n, i), self.assign[i], self.value_rows(i, np.arange(n)))
        self.trained_at = n
        self._sort()

    def _split(self):
        """Split the clusters new keys grew past SPLIT × cluster_size, by k-means of their own keys.

        Later keys drift from the early ones (new content, new positions), so without this the clusters
        trained on the first keys swell; splitting locally costs O(cluster) and keeps them even."""
        self.unsplit = 0
        big = np.nonzero(self.counts > SPLIT * self.cluster_size)
        if not len(big[0]):
            return False
        self._near = None
        grown = [[] for _ in range(self.h)]
        moved = []  # (head, split cluster, its members): their moments move once the new clusters exist
        for i, j in zip(*big):
            members = np.nonzero(self.assign[i] == j)[0]
            parts = -(-len(members) // self.cluster_size)
            km = faiss.Kmeans(self.dim, parts, niter=8, seed=self.seed, min_points_per_centroid=1)
            km.train(np.ascontiguousarray(self.keys[i, members] @ self.A[i]))
            _, a = km.index.search(np.ascontiguousarray(self.keys[i, members] @ self.A[i]), 1)
            base = self.centroids.shape[1] + len(grown[i]) - 1  # part 0 keeps cluster j's slot
            self.centroids[i, j] = km.centroids[0]
            self.assign[i, members] = np.where(a[:, 0] == 0, j, base + a[:, 0]).astype(np.int32)
            grown[i].extend(km.centroids[1:])
            moved.append((i, j, members))
        # heads share the cluster count: pad the heads that split less with empty clusters far away
        extra = max(len(g) for g in grown)
        pad = np.full((self.h, extra, self.dim), 0, np.float32)
        for i, g in enumerate(grown):
            if g:
                pad[i, :len(g)] = np.stack(g)
            pad[i, len(g):] = EMPTY_CENTROID
        self.centroids = np.concatenate([self.centroids, pad], axis=1)
        self.counts = np.concatenate([self.counts, np.zeros((self.h, extra), np.int64)], axis=1)
        for i, j, members in moved:  # only the split clusters' members moved
            self.counts[i, j] -= len(members)
            self.counts[i] += np.bincount(self.assign[i, members], minlength=self.counts.shape[1])
        for i, j, members in moved:
            heads, rows = np.full(len(members), i), self.keys[i, members]
            self._moments(heads, np.full(len(members), j), rows, -1.0)
            self._moments(heads, self.assign[i, members], rows)
            if self.v1 is not None:
                vals = self.value_rows(i, members)
                self._value_sums(heads, np.full(len(members), j), vals, -1.0)
                self._value_sums(heads, self.assign[i, members], vals)
        return True

    def _value_sums(self, heads: np.ndarray, clusters: np.ndarray, values: torch.Tensor, sign: float = 1.0):
        """Add (sign -1: take away) values [N, Dv] to the value sums of their keys' clusters."""
        c = self.centroids.shape[1]
        if self.v1 is None:
            self.v1 = torch.zeros(self.h, c, values.shape[-1])
        elif self.v1.shape[1] < c:  # clusters were split: room for the new ones
            self.v1 = torch.cat([self.v1, torch.zeros(self.h, c - self.v1.shape[1], self.v1.shape[2])], 1)
        idx = torch.from_numpy(np.asarray(heads, np.int64) * c + np.asarray(clusters, np.int64))
        self.v1.view(-1, self.v1.shape[2]).index_add_(0, idx, values.float(), alpha=sign)

    def _moments(self, heads: np.ndarray, clusters: np.ndarray, keys: np.ndarray, sign: float = 1.0):
        """Add (sign -1: take away) keys [N, D] to the sums of their clusters (heads [N], clusters [N])."""
        c = self.centroids.shape[1]
        if self.m1 is None:
            self.m1, self.m2 = (torch.zeros(self.h, c, self.dim) for _ in range(2))
        elif self.m1.shape[1] < c:  # clusters were split: room for the new ones
            more = torch.zeros(self.h, c - self.m1.shape[1], self.dim)
            self.m1, self.m2 = torch.cat([self.m1, more], 1), torch.cat([self.m2, more], 1)
        idx = torch.from_numpy(np.asarray(heads, np.int64) * c + np.asarray(clusters, np.int64))
        for a in range(0, len(idx), 1 << 14):  # in chunks: squaring every key at once would copy them all
            k = torch.from_numpy(np.ascontiguousarray(keys[a:a + (1 << 14)], dtype=np.float32))
            self.m1.view(-1, self.dim).index_add_(0, idx[a:a + (1 << 14)], k, alpha=sign)
            self.m2.view(-1, self.dim).index_add_(0, idx[a:a + (1 << 14)], k * k, alpha=sign)

    def _count(self, assign: np.ndarray) -> np.ndarray:
        """Keys per cluster [h, c] of the assignments [h, m]."""
        return np.stack([np.bincount(a, minlength=self.centroids.shape[1]) for a in assign])

    def _nearest(self, keys: np.ndarray) -> np.ndarray:
        """Cluster [h, b] of keys [h, b, D]: the nearest centroid to the whitened key."""
        if self._near is None:  # kept: a block's b keys would otherwise copy every centroid
            self._near = ((self.centroids ** 2).sum(-1)[:, None, :],
                          np.ascontiguousarray(self.centroids.transpose(0, 2, 1)))
        norms, cT = self._near
        d = norms - 2 * _bmm(_bmm(keys, self.A), cT)  # [h, b, c]
        return d.argmin(-1).astype(np.int32)

    def _sort(self):
        c = self.centroids.shape[1]
        a = self.assign.astype(np.uint16) if c <= 1 << 16 else self.assign  # 16-bit keys: numpy radix-sorts them, 7x faster
        self.order = np.argsort(a, axis=1, kind="stable").astype(np.int32)  # [h, n]
        counts = self.counts
        self.starts = np.concatenate([np.zeros((self.h, 1), np.int64), np.cumsum(counts, 1)], axis=1)
        self.logn = np.log(np.maximum(counts, 1)).astype(np.float32)  # [h, c], for _rest
        n = torch.from_numpy(np.maximum(counts, 1)).float()[..., None]  # clusters stay small: float32 sums keep
        mean = self.m1 / n
        var = (self.m2 / n - mean * mean).clamp_min(0)
        # kept as [h, D, c]: a search multiplies by them as they are (a transposed view would be copied)
        self.mean, self.var = (t.transpose(1, 2).contiguous().numpy() for t in (mean, var))

    def _insert(self, new: np.ndarray, added: np.ndarray):
        """Put the keys just added (ids n - b .. n - 1, clusters new [h, b], added [h, c] of them per cluster)
        at the ends of their clusters in the sorted order, as a stable sort would, and refresh those
        clusters' mean and spread."""
        h, b = new.shape
        c = self.centroids.shape[1]
        ids = np.arange(self.n - b, self.n, dtype=np.int32)
        self.order = np.stack([np.insert(self.order[i], self.starts[i, new[i] + 1], ids) for i in range(h)])
        self.starts[:, 1:] += np.cumsum(added, 1)
        hh, jj = np.divmod(np.unique(np.arange(h)[:, None] * c + new), c)  # touched (head, cluster) pairs
        n = torch.from_numpy(np.maximum(self.starts[hh, jj + 1] - self.starts[hh, jj], 1)).float()[:, None]
        self.logn[hh, jj] = np.log(n[:, 0].numpy())
        hi, ji = torch.from_numpy(hh), torch.from_numpy(jj)
        mean = self.m1[hi, ji] / n  # [t, D]
        var = (self.m2[hi, ji] / n - mean * mean).clamp_min(0)
        self.mean[hh, :, jj], self.var[hh, :, jj] = mean.numpy(), var.numpy()

    def search(self, queries: np.ndarray, k: int):
        """Top-k keys of each query.

        Args:
            queries: [h, G, D] (the G query heads of a group share one candidate set).
            k: keys per query.
        Returns:
            (ids [h, G, k] int64, -1 where fewer than k keys; keys scanned per head [h], two per cluster ranked included).
        """
        q = np.asarray(queries, np.float32)
        cand, valid, keys, scanned = self.candidates(q, least=k)
        return self._rescore(q, cand, keys, valid, k), scanned

    def candidates(self, queries: np.ndarray, least: int = 1, rest: bool = False):
        """The keys a search scores exactly: each head's probed clusters, shared by its G query heads.

        Args:
            queries: [h, G, D].
            least: clusters are probed until at least this many keys are gathered, even past the scan budget.
            rest: also estimate the attention the unprobed clusters hold (needs value_rows, see __init__).
        Returns:
            (ids [h, C] int64 (0 in padding), valid [h, C] bool, keys [h, C, D] float32 tensor,
             keys scanned per head [h], two per cluster ranked included), and with rest=True
            (o [h, G, Dv], lse [h, G]) of the unprobed clusters (see _rest; lse -inf where none is left).
        """
        q = np.asarray(queries, np.float32)
        h = q.shape[0]
        if not self.trained_at:  # too few keys for an index: score them all
            cand = np.ascontiguousarray(np.broadcast_to(np.arange(self.n), (h, self.n)))
            out = cand, np.ones((h, self.n), bool), torch.from_numpy(self.keys[:, :self.n]), np.full(h, float(self.n))
            return out + (self._nothing_left(q),) if rest else out
        if self.order is None:
            for _ in range(3):  # what a prefill's blocks grew since the last batch (a part can still be big)
                if not self._split():
                    break
            self._sort()
        c = self.centroids.shape[1]
        # a cluster's expected softmax weight per key, log E[exp(s)] ~ scale q·mean + scale²/2 Σ q² var
        # (Gaussian scores), best over the group: it ranks spread clusters above tight ones of equal mean
        cm = self.scale * _bmm(q, self.mean)  # [h, G, c]: each cluster's mean score
        cs = (cm + self.scale ** 2 / 2 * _bmm(q * q, self.var)).max(1)  # [h, c]
        counts = self.counts  # [h, c], as the sorted order has them
        budget = self.scan * self.n if self.max_scan is None else min(self.scan * self.n, self.max_scan)
        want = max(least, budget)
        rank, sizes = self._ranked(np.where(counts > 0, cs, -np.inf), counts, want)  # [h, m] x2
        before = np.cumsum(sizes, 1) - sizes  # keys gathered before each ranked cluster
        take = before < want  # [h, m]: clusters probed (the first always)
        hh, r = np.nonzero(take)
        lens = sizes[hh, r]
        first = self.starts[hh, rank[hh, r]]  # where each probed cluster starts in its head's order
        total = lens.sum()
        head_of = np.repeat(hh, lens)  # [N]
        seg = np.repeat(np.cumsum(lens) - lens, lens)
        src = np.repeat(first, lens) + np.arange(total) - seg  # offset in order[head]
        ids = self.order[head_of, src]  # [N] key ids
        per = np.bincount(head_of, minlength=h)  # candidates per head
        slot = np.arange(total) - np.repeat(np.cumsum(per) - per, per)
        width = max(1, per.max())
        cand = np.zeros((h, width), np.int64)
        valid = np.zeros((h, width), bool)
        cand[head_of, slot], valid[head_of, slot] = ids, True
        flat = torch.from_numpy(self.keys).view(-1, self.dim)  # [h * capacity, D]
        rows = torch.from_numpy(cand + np.arange(h)[:, None] * self.keys.shape[1])
        keys = flat.index_select(0, rows.view(-1)).view(h, width, self.dim)  # one gather for every head
        out = cand, valid, keys, (per + 2 * c).astype(np.float64)  # ranking scores a mean and a spread per cluster
        if not rest:
            return out
        if self.v1 is None:
            raise ValueError("candidates(rest=True) needs value_rows set before the index is trained")
        probed = np.zeros((h, c), bool)
        probed[hh, rank[hh, r]] = True
        return out + (self._rest(cm, counts, probed),)

    def _rest(self, cm: np.ndarray, counts: np.ndarray, probed: np.ndarray):
        """The attention (o [h, G, Dv], lse [h, G]) the unprobed clusters hold, estimated per cluster from
        its size n, its mean score (cm [h, G, c]) and its mean value:
            lse ≈ logsumexp_j (log n_j + cm_j),  o ≈ Σ_j softmax_j · v1_j / n_j
        so the mass of the keys no search reaches is attended to, not dropped. By Jensen, n exp(mean
        score) is at most the cluster's true mass: the estimate errs low, never claiming weight its keys
        do not have (the ranking's spread term, added here, overshot by up to 1.8 nats on SmolLM2's
        unprobed clusters and lost end-to-end agreement; this lower bound gained it)."""
        left = ~probed & (counts > 0)  # [h, c]
        # numpy for the small elementwise steps: torch would wake its thread pool for each of them
        z = np.where(left[:, None, :], cm + self.logn[:, None, :], np.float32(-np.inf))  # [h, G, c]
        top = z.max(-1, keepdims=True)  # [h, G, 1]
        top = np.where(np.isfinite(top), top, np.float32(0))
        e = np.exp(z - top)  # [h, G, c]
        total = e.sum(-1)  # [h, G]
        with np.errstate(divide="ignore"):
            lse = np.log(total) + top[..., 0]  # -inf where nothing is left
        w = e / (np.maximum(total, 1e-30)[..., None] * np.maximum(counts, 1)[:, None, :].astype(np.float32))
        return torch.bmm(torch.from_numpy(w.astype(np.float32)), self.v1), torch.from_numpy(lse.astype(np.float32))

    def _nothing_left(self, q: np.ndarray):
        dv = self.v1.shape[2] if self.v1 is not None else self.dim
        return torch.zeros(q.shape[0], q.shape[1], dv), torch.full(q.shape[:2], float("-inf"))

    @staticmethod
    def _ranked(score: np.ndarray, counts: np.ndarray, want: float):
        """The best-scored clusters (ids [h, m], sizes [h, m], best first), enough of them to hold `want`
        keys in every head: a partial sort of twice the clusters needed on average, all of them if short."""
        h, c = score.shape
        m = min(c, int(2 * want * c / max(1, counts.sum() / h)) + 8)
        if m < c:
            top = np.argpartition(-score, m - 1, axis=1)[:, :m]  # [h, m], unordered
            rank = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), axis=1), 1)
            sizes = np.take_along_axis(counts, rank, 1)
            if (sizes.sum(1) >= want).all():
                return rank, sizes
        rank = np.argsort(-score, axis=1)  # empty (padding) clusters last
        return rank, np.take_along_axis(counts, rank, 1)

    @staticmethod
    def _rescore(q, cand, keys, valid, k):
        """Exact scores of candidate keys [h, C, D] (array or tensor) -> top-k ids [h, G, k] (sorted, -1 padded)."""
        keys = torch.as_tensor(keys)
        s = torch.bmm(torch.from_numpy(q), keys.transpose(1, 2))  # [h, G, C]
        s.masked_fill_(~torch.from_numpy(np.ascontiguousarray(valid))[:, None, :], float("-inf"))
        kk = min(k, s.shape[2])
        ts, top = torch.topk(s, kk, dim=2)  # sorted, best first
        ids = torch.gather(torch.from_numpy(np.ascontiguousarray(cand))[:, None, :].expand(s.shape), 2, top).numpy()
        ids = np.where(torch.isfinite(ts).numpy(), ids, -1)
        if kk < k:
            ids = np.concatenate([ids, np.full(ids.shape[:2] + (k - kk,), -1)], axis=2)
        return ids.astype(np.int64)

    def nbytes(self) -> int:
        """Memory held: keys (float32), assignment and sorted order (int32), centroids, whitening and each
        cluster's key moments and their mean / spread (float32)."""
        extra = 0 if self.centroids is None else 5 * self.centroids.nbytes + 2 * self.h * self.dim ** 2 * 4 + self.h * 8 * (
            self.centroids.shape[1] + 1)
        values = 0 if self.v1 is None else self.v1.numel() * 4
        return self.h * self.n * (self.dim * 4 + 8) + self.qsum.nbytes + extra + values
