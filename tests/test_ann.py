"""The per-head comparison indexes of kvstore/ann.py (long_context.py's rows): exact when they look at everything."""

import numpy as np
import pytest

from hetero.kvstore.ann import L2_HEADROOM, FlatIndex, HNSWIndex


def _keys(n, d, rng, spread=3.0):
    # norms that vary, as real attention keys' do
    return (rng.standard_normal((n, d)) * rng.uniform(0.2, spread, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_a_graph_searched_through_every_key_returns_the_exact_top_keys(metric):
    rng = np.random.default_rng(0)
    keys, q = _keys(600, 16, rng), rng.standard_normal((3, 16)).astype(np.float32)
    g, flat = HNSWIndex(16, M=8, ef=600, ef_construction=64, metric=metric), FlatIndex(16)
    for a in range(0, len(keys), 64):  # block by block, as the cache adds them
        g.add(keys[a:a + 64])
        flat.add(keys[a:a + 64])
    ids, scanned = g.search(q, 10)
    exact, _ = flat.search(q, 10)
    assert [set(r) for r in ids.tolist()] == [set(r) for r in exact.tolist()]
    assert 0 < scanned <= len(keys) + 64 and g.ntotal == len(keys)


def test_the_l2_graph_lifts_keys_to_one_norm_and_rebuilds_when_a_longer_key_arrives():
    rng = np.random.default_rng(1)
    g = HNSWIndex(8, M=8, ef=200, metric="l2")
    short = _keys(64, 8, rng, spread=1.0)
    g.add(short)
    first = g.bound
    assert first == pytest.approx(L2_HEADROOM * np.linalg.norm(short, axis=1).max(), rel=1e-5)
    lifted = g._lifted(short)
    assert np.allclose(np.linalg.norm(lifted, axis=1), first, rtol=1e-4)
    g.add(short * 0.5)  # within the bound: no rebuild
    assert g.bound == first and g.ntotal == 128
    g.add(short * 10)  # longer than the bound: the graph is rebuilt with every key lifted to the new norm
    assert g.bound > first and g.ntotal == 192
    ids, _ = g.search(short[:2] * 10, 3)
    keys = np.concatenate([short, short * 0.5, short * 10])
    exact = np.argsort(-(short[:2] * 10) @ keys.T, axis=1)[:, :3]
    assert [set(r) for r in ids.tolist()] == [set(r) for r in exact.tolist()]


def test_graph_memory_counts_faiss_own_arrays_and_half_precision_halves_the_keys():
    rng = np.random.default_rng(2)
    keys = _keys(512, 32, rng)
    full, half = HNSWIndex(32, M=8), HNSWIndex(32, M=8, fp16=True)
    full.add(keys)
    half.add(keys)
    graph = full.nbytes() - keys.nbytes
    assert graph >= 512 * (4 * 2 * 8 + 8 + 4)  # level-0 slots, offsets, levels
    assert half.nbytes() == pytest.approx(keys.nbytes / 2 + graph, rel=0.05)
    with pytest.raises(ValueError, match="metric"):
        HNSWIndex(32, metric="cosine")
