"""Maximum-inner-product indexes over one KV head's keys, all with one interface.

    add(keys [n, D])             keys get ids 0, 1, ... in the order added
    learn(queries [m, D])        real queries seen so far (only the query-aware index uses them)
    search(queries [G, D], k)    -> ids [G, k] (-1 where fewer than k), keys scanned per query
    nbytes()                     memory held, keys included

Queries and keys come from different projections, so a query's best keys are not near it in the
space an index built from keys alone learns (RetrievalAttention, section 3): IVF built on keys, or a
key-key HNSW graph, must scan many keys for good recall. QueryRoutedIndex uses the real queries the
model produced at prefill instead: it clusters them, and links each cluster to the keys its member
queries score highest; a decode query probes its nearest query clusters and rescores the union of
their links exactly. These per-head indexes are the comparison rows of benchmarks/long_context.py;
retrieval attention uses qivf.WhitenedIVF (batched over heads), which measured best there.

Shape legend: n keys, m learned queries, G queries per search (the query heads of one KV group),
D head dim, c clusters.
"""

import faiss
import numpy as np

IVF_MIN_TRAIN = 39  # faiss's k-means wants about this many points per centroid
L2_HEADROOM = 1.1  # HNSWIndex(metric="l2"): B over the longest key so far


class FlatIndex:
    """Exact search (faiss IndexFlatIP): the oracle, scanning every key."""

    def __init__(self, dim: int):
        self.index = faiss.IndexFlatIP(dim)

    def add(self, keys: np.ndarray):
        self.index.add(np.ascontiguousarray(keys, dtype=np.float32))

    def learn(self, queries: np.ndarray):
        pass

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int):
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.ntotal))
        return ids, float(self.ntotal)

    def nbytes(self) -> int:
        return self.ntotal * self.index.d * 4


class IVFIndex:
    """faiss IndexIVFFlat, inner product, trained on the first keys added (flat search until then)."""

    def __init__(self, dim: int, nlist: int = 64, nprobe: int = 8):
        self.dim, self.nlist, self.nprobe = dim, nlist, nprobe
        self.pending: list[np.ndarray] = []
        self.index = None

    def add(self, keys: np.ndarray):
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if self.index is None:
            self.pending.append(keys)
            allk = np.concatenate(self.pending)
            if len(allk) < self.nlist * IVF_MIN_TRAIN:
                return
            quant = faiss.IndexFlatIP(self.dim)
            self.index = faiss.IndexIVFFlat(quant, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.min_points_per_centroid = 1
            self.index.train(allk)
            self.index.add(allk)
            self.pending = []
        else:
            self.index.add(keys)

    def learn(self, queries):
        pass

    @property
    def ntotal(self) -> int:
        return self.index.ntotal if self.index is not None else sum(len(p) for p in self.pending)

    def search(self, queries: np.ndarray, k: int):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index is None:
            allk = np.concatenate(self.pending)
            s = q @ allk.T
            return np.argsort(-s, axis=1)[:, :k], float(len(allk))
        self.index.nprobe = self.nprobe
        stats = faiss.cvar.indexIVF_stats
        stats.reset()
        _, ids = self.index.search(q, k)
        return ids, (stats.ndis + len(q) * self.nlist) / len(q)

    def nbytes(self) -> int:
        if self.index is None:
            return sum(p.nbytes for p in self.pending)
        return self.ntotal * (self.dim * 4 + 8) + self.nlist * self.dim * 4  # codes + ids + centroids


class HNSWIndex:
    """faiss HNSW graph over one head's keys (fp16=True: IndexHNSWSQ, the keys kept as float16, half the memory).

    metric="ip" builds the graph on inner products directly. metric="l2" searches the same top keys on a
    graph built for Euclidean distance instead: each key k gets one more coordinate, sqrt(B² - |k|²), so
    every key has norm B and |q' - k'|² = |q|² + B² - 2 q·k for the query q' = (q, 0) — the nearest keys
    are the highest scoring ones (the standard maximum-inner-product to nearest-neighbour reduction).
    HNSW's neighbour selection is made for a metric space; on real attention keys, whose norms vary a
    lot, the inner-product graph links every key to the few largest ones and its searches stall there
    (long_context.py: SmolLM2 at 8K, recall@100 0.54 scanning 8% vs 0.95 at 13% on the l2 graph).
    B is set from the first keys with headroom (L2_HEADROOM: the lifted coordinate of every key grows
    with B, and a B far above the longest key flattens the graph's geometry); a later key longer than B
    rebuilds the graph with a larger one (while the longest key grows, which it stops doing early on).
    """

    def __init__(self, dim: int, M: int = 16, ef: int = 64, ef_construction: int = 64, fp16: bool = False,
                 metric: str = "ip"):
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric {metric!r}: 'ip' or 'l2'")
        self.dim, self.M, self.ef, self.efc, self.fp16, self.metric = dim, M, ef, ef_construction, fp16, metric
        self.key_bytes = 2 if fp16 else 4
        self.bound = 0.0  # B of the l2 reduction
        self.keys = []  # l2: the raw keys added, kept to rebuild with a larger B
        self.index = self._new()

    def _new(self):
        d = self.dim + (self.metric == "l2")
        mt = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        ix = (faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, self.M, mt) if self.fp16
              else faiss.IndexHNSWFlat(d, self.M, mt))
        ix.hnsw.efConstruction = self.efc
        return ix

    def _lifted(self, keys: np.ndarray) -> np.ndarray:
        """keys [n, D] -> [n, D + 1] of norm B."""
        extra = np.sqrt(np.maximum(self.bound ** 2 - np.einsum("nd,nd->n", keys, keys), 0.0))
        return np.ascontiguousarray(np.concatenate([keys, extra[:, None]], 1), dtype=np.float32)

    def _insert(self, vectors: np.ndarray):
        if not self.index.is_trained:  # float16 needs no statistics, but faiss asks for a train() call
            self.index.train(vectors)
        self.index.add(vectors)

    def add(self, keys: np.ndarray):
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if self.metric == "ip":
            self._insert(keys)
            return
        self.keys.append(keys)
        top = float(np.sqrt(np.einsum("nd,nd->n", keys, keys).max(initial=0.0)))
        if top > self.bound:  # first keys, or one longer than B: (re)build with headroom
            self.bound = L2_HEADROOM * top
            self.index = self._new()
            self._insert(self._lifted(np.concatenate(self.keys)))
        else:
            self._insert(self._lifted(keys))

    def learn(self, queries):
        pass

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.metric == "l2":
            q = np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), 1), np.float32)], 1))
        self.index.hnsw.efSearch = max(self.ef, k)
        stats = faiss.cvar.hnsw_stats
        stats.reset()
        _, ids = self.index.search(q, k)
        return ids, stats.ndis / len(queries)

    def nbytes(self) -> int:
        # keys (l2: with their extra coordinate), and the graph as faiss holds it: neighbour ids (int32,
        # 2M slots at level 0 and M per upper level), each node's offset into them (size_t) and its level
        # (int32). (The raw keys an l2 index keeps for a rebuild are the KV store's own, not counted.)
        h = self.index.hnsw
        return (self.ntotal * self.index.d * self.key_bytes + 4 * h.neighbors.size() + 8 * h.offsets.size()
                + 4 * h.levels.size())


class QueryRoutedIndex:
    """Keys reached through the real queries seen so far (the query-aware index).

    Each learned query links to its `links` best keys; learned queries are clustered (spherical
    k-means, on direction: a query's norm does not change which keys it ranks first); a cluster's
    list is the union of its members' links. New keys join a cluster's list when they beat the
    `links`-th score of one of its members, so the index grows with the sequence without a rebuild.

    Args:
        dim: head dim.
        clusters: query clusters (fewer when fewer queries are learned).
        links: best keys linked per learned query.
        nprobe: clusters probed per decode query.
        max_queries: learned queries kept (a uniform sample of what was offered).
    """

    def __init__(self, dim: int, clusters: int = 64, links: int = 32, nprobe: int = 6, max_queries: int = 1024,
                 seed: int = 0):
        self.dim, self.clusters, self.links, self.nprobe = dim, clusters, links, nprobe
        self.max_queries = max_queries
        self.rng = np.random.default_rng(seed)
        self.keys = np.empty((0, dim), np.float32)
        self.n = 0
        self.pool: list[np.ndarray] = []  # queries offered before the index is built
        self.Q = None  # [m, D] learned queries
        self.centroids = None  # [c, D] unit vectors
        self.assign = None  # [m] cluster of each learned query
        self.thresh = None  # [m] the links-th best score of each learned query
        self.lists: list[np.ndarray] = []  # per cluster: key ids (int32, sorted, unique)

    @property
    def ntotal(self) -> int:
        return self.n

    def _grow(self, keys):
        if self.n + len(keys) > len(self.keys):
            bigger = np.empty((max(2 * len(self.keys), self.n + len(keys), 1024), self.dim), np.float32)
            bigger[:self.n] = self.keys[:self.n]
            self.keys = bigger
        self.keys[self.n:self.n + len(keys)] = keys
        self.n += len(keys)

    def learn(self, queries: np.ndarray):
        """Offer real queries [m, D]; they are used when the index is (re)built."""
        self.pool.append(np.ascontiguousarray(queries, dtype=np.float32))

    def build(self):
        """Cluster the learned queries and link each to its best keys among those added so far."""
        Q = np.concatenate(self.pool) if self.pool else np.empty((0, self.dim), np.float32)
        if len(Q) > self.max_queries:
            Q = Q[np.sort(self.rng.choice(len(Q), self.max_queries, replace=False))]
        self.pool = [Q]
        if len(Q) == 0 or self.n == 0:
            return
        c = max(1, min(self.clusters, len(Q) // 8))
        unit = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12)
        km = faiss.Kmeans(self.dim, c, niter=12, spherical=True, seed=1, min_points_per_centroid=1)
        km.train(unit)
        self.centroids = km.centroids.astype(np.float32)
        _, a = km.index.search(unit, 1)
        self.Q, self.assign = Q, a[:, 0]
        L = min(self.links, self.n)
        S = Q @ self.keys[:self.n].T  # [m, n]
        top = np.argpartition(-S, L - 1, axis=1)[:, :L]  # [m, L]
        self.thresh = np.take_along_axis(S, top, 1).min(axis=1)
        self.lists = [np.unique(top[self.assign == j]).astype(np.int32) for j in range(c)]

    def add(self, keys: np.ndarray):
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        first = self.n
        self._grow(keys)
        if self.Q is None:
            return
        hit = (self.Q @ keys.T) >= self.thresh[:, None]  # [m, b]: beats a member's links-th best key
        q_idx, k_idx = np.nonzero(hit)
        for j in np.unique(self.assign[q_idx]):
            new = np.unique(k_idx[self.assign[q_idx] == j]).astype(np.int32) + first
            self.lists[j] = np.concatenate([self.lists[j], new])

    def search(self, queries: np.ndarray, k: int):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.Q is None:
            self.build()
        if self.Q is None:  # nothing learned yet: scan everything
            s = q @ self.keys[:self.n].T
            return np.argsort(-s, axis=1)[:, :k], float(self.n)
        c = len(self.centroids)
        p = min(self.nprobe, c)
        near = np.argpartition(-(q @ self.centroids.T), p - 1, axis=1)[:, :p]  # [G, p]
        cand = np.unique(np.concatenate([self.lists[j] for j in np.unique(near)]))
        if len(cand) == 0:
            return np.full((len(q), k), -1), float(c)
        s = q @ self.keys[cand].T  # [G, |cand|]: the G heads of a group rescore one shared candidate set
        kk = min(k, len(cand))
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        ids = cand[np.take_along_axis(top, order, 1)].astype(np.int64)
        if kk < k:
            ids = np.concatenate([ids, np.full((len(q), k - kk), -1)], axis=1)
        return ids, float(c + len(cand))

    def nbytes(self) -> int:
        lists = sum(len(x) for x in self.lists) * 4
        learned = 0 if self.Q is None else self.Q.nbytes + self.thresh.nbytes + self.assign.nbytes + self.centroids.nbytes
        return self.n * self.dim * 4 + lists + learned
