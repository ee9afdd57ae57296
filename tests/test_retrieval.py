"""Retrieval attention: the query-aware index finds planted keys, retrieval with top-k covering every
off-device key is exact attention, every scanned key is attended (exact V in memory, the 4-bit copy on
disk past each head's top-k), and it runs end to end through load_offloaded and the CLI."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from hetero.api import load_offloaded
from hetero.errors import HeteroError
from hetero.kvstore import paged, retrieval
from hetero.kvstore.attention import merge
from hetero.kvstore.ann import FlatIndex
from hetero.kvstore.qivf import WhitenedIVF

pytest.importorskip("transformers")

from helpers import EOS, VOCAB, over_budget, tiny_checkpoint  # noqa: E402

BLOCK, T, NEW = 4, 20, 30


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(paged, "BLOCK_TOKENS", BLOCK)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _clustered(n=4096, d=64, seed=0):
    """Keys in 64 clusters plus a loud subspace that queries never look along (they come from another
    projection): clustering raw keys splits on the loud directions, clustering as the queries see them does not."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d)).astype(np.float32)
    keys = centres[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    keys[:, :16] = 6 * rng.normal(size=(n, 16))

    def queries(m):
        q = 2 * rng.normal(size=(m, d)).astype(np.float32)
        q[:, :16] = 0
        return q
    return keys, queries


def _recall(whiten: bool):
    """recall@10 and share of keys scanned, two kv heads searched together, 3 query heads per group."""
    heads = [_clustered(seed=s) for s in (0, 1)]
    ix, flats = WhitenedIVF(2, 64, scan=0.2, whiten=whiten), [FlatIndex(64), FlatIndex(64)]
    ix.learn(np.stack([queries(1024) for _, queries in heads]))
    for parts in zip(*(np.array_split(keys, 16) for keys, _ in heads)):  # added block by block, as the cache does
        ix.add(np.stack(parts))
        for f, part in zip(flats, parts):
            f.add(part)
    recalls, scanned = [], []
    for _ in range(60):
        qs = [queries(3) for _, queries in heads]
        ids, n_scan = ix.search(np.stack(qs), 10)  # [2, 3, 10]
        for i in range(2):
            exact, _ = flats[i].search(qs[i], 10)
            recalls += [len(set(ids[i, g]) & set(exact[g])) / 10 for g in range(3)]
        scanned.append(n_scan / 4096)
    return np.mean(recalls), np.mean(scanned), ix.nbytes() / (2 * heads[0][0].nbytes)


def test_query_whitened_index_beats_clustering_the_keys_alone():
    recall, scanned, memory = _recall(whiten=True)
    raw_recall, raw_scanned, _ = _recall(whiten=False)
    assert recall >= 0.8 and raw_recall <= 0.5, (recall, raw_recall)
    assert scanned <= 0.25 and raw_scanned <= 0.25
    assert memory <= 1.25


def test_query_aware_index_scanning_everything_is_exact_and_keeps_clusters_even():
    rng = np.random.default_rng(5)
    ix, flat = WhitenedIVF(1, 16, cluster_size=32, scan=1.0), FlatIndex(16)
    ix.learn(rng.normal(size=(1, 200, 16)))
    for t in range(40):  # keys drift as the sequence goes on: early clusters must not swell
        block = (rng.normal(size=(64, 16)) + t * 0.5).astype(np.float32)
        ix.add(block[None])
        flat.add(block)
    q = rng.normal(size=(4, 16)).astype(np.float32)
    ids, _ = ix.search(q[None], 50)
    assert np.diff(ix.starts[0]).max() <= 2 * 32
    exact, _ = flat.search(q, 50)
    assert (ids[0] == exact).all()
    few, _ = ix.search(q[None], 5000)  # more than there are keys: padded with -1
    assert (few[0, :, 2560:] == -1).all() and (np.sort(few[0, :, :2560], 1) == np.arange(2560)).all()


def test_cluster_moments_follow_adds_and_splits():
    rng = np.random.default_rng(7)
    ix = WhitenedIVF(2, 16, cluster_size=32, scan=0.05)
    ix.learn(rng.normal(size=(2, 200, 16)))
    for t in range(40):  # drifting keys: clusters are split as they grow
        ix.add((rng.normal(size=(2, 64, 16)) + t * 0.5).astype(np.float32))
    ix.search(rng.normal(size=(2, 3, 16)).astype(np.float32), 5)
    assert ix.centroids.shape[1] > 2560 // 32  # splits happened
    np.testing.assert_array_equal(ix.counts, [np.bincount(a, minlength=ix.centroids.shape[1]) for a in ix.assign])
    for i in range(2):
        for j in range(ix.centroids.shape[1]):
            members = ix.keys[i, :ix.n][ix.assign[i] == j].astype(np.float64)
            np.testing.assert_allclose(ix.m1[i, j].numpy(), members.sum(0), rtol=1e-4, atol=1e-2)
            np.testing.assert_allclose(ix.m2[i, j].numpy(), (members ** 2).sum(0), rtol=1e-4, atol=1e-1)



def test_a_prefill_splits_in_batches_and_the_first_search_sees_even_clusters(monkeypatch):
    rng = np.random.default_rng(9)
    ix = WhitenedIVF(2, 16, cluster_size=32, scan=0.05)
    ix.learn(rng.normal(size=(2, 200, 16)))
    checks = []
    split = WhitenedIVF._split
    monkeypatch.setattr(WhitenedIVF, "_split", lambda self: checks.append(self.n) or split(self))
    blocks = 160
    for t in range(blocks):  # a prefill: block after block of drifting keys, no search
        ix.add((rng.normal(size=(2, 64, 16)) + t * 0.2).astype(np.float32))
    assert 0 < len(checks) < blocks // 8  # in batches, not after every block
    ix.search(rng.normal(size=(2, 3, 16)).astype(np.float32), 5)
    assert ix.counts.max() <= 2 * 32  # split before the first search
    np.testing.assert_array_equal(ix.counts, [np.bincount(a, minlength=ix.centroids.shape[1]) for a in ix.assign])
    checks.clear()
    for t in range(4):  # then decode-like: every block is checked, as searches follow it
        ix.add((rng.normal(size=(2, 64, 16)) + 40).astype(np.float32))
        ix.search(rng.normal(size=(2, 3, 16)).astype(np.float32), 5)
    assert len(checks) >= 4 and ix.counts.max() <= 2 * 32


def _valued_index(rng, heads=2, dim=16, n=3008, drift=0.0, scan=0.1):
    """An index over n keys per head whose values live in `store` [h, n, dim] (the owner's copy)."""
    store = torch.zeros(heads, n, dim)
    ix = WhitenedIVF(heads, dim, cluster_size=32, scan=scan)
    ix.value_rows = lambda head, ids: store[head, torch.from_numpy(np.asarray(ids))]
    ix.learn(rng.normal(size=(heads, 300, dim)))
    for a in range(0, n, 64):
        keys = (rng.normal(size=(heads, 64, dim)) + drift * a / 64).astype(np.float32)
        vals = torch.from_numpy(rng.normal(size=(heads, 64, dim)).astype(np.float32)) + 1.0
        store[:, a:a + 64] = vals  # first, as RetrievalLayer does: the index reads the values back
        ix.add(keys)
    return ix, store


def test_cluster_value_sums_follow_adds_and_splits():
    ix, store = _valued_index(np.random.default_rng(8), drift=0.3)
    ix.search(np.zeros((2, 1, 16), np.float32), 5)
    assert ix.centroids.shape[1] > 3000 // 32  # splits happened
    for i in range(2):
        for j in range(0, ix.centroids.shape[1], 7):
            members = torch.from_numpy(np.nonzero(ix.assign[i] == j)[0])
            np.testing.assert_allclose(ix.v1[i, j].numpy(), store[i, members].sum(0).numpy(), rtol=1e-4, atol=1e-3)


def test_unprobed_estimate_is_a_lower_bound_and_recovers_a_flat_heads_mass():
    rng = np.random.default_rng(9)
    ix, store = _valued_index(rng)
    keys = torch.from_numpy(ix.keys[:, :ix.n])
    for sharp in (3.0, 0.1):  # a peaked head, then a flat one (tiny query)
        q = (sharp * rng.normal(size=(2, 3, 16))).astype(np.float32)
        cand, valid, _, _, (o_u, lse_u) = ix.candidates(q, rest=True)
        s = torch.bmm(torch.from_numpy(q), keys.transpose(1, 2)) * ix.scale  # [h, G, n]
        unprobed = torch.ones(2, 1, ix.n, dtype=torch.bool)
        for h in range(2):
            unprobed[h, 0, torch.from_numpy(cand[h][valid[h]])] = False
        lse_p = torch.logsumexp(s.masked_fill(unprobed, float("-inf")), -1)
        assert (lse_u <= torch.logsumexp(s.masked_fill(~unprobed, float("-inf")), -1) + 1e-4).all()  # Jensen
    # the flat head: most of its mass is unprobed, and the estimate gets its output nearly right
    full = torch.softmax(s, -1) @ store  # exact attention over every key [h, G, D]
    probed = torch.softmax(s.masked_fill(unprobed, float("-inf")), -1) @ store
    merged, _ = merge(probed, lse_p, o_u, lse_u)
    err = lambda o: ((o - full).norm(dim=-1) / full.norm(dim=-1)).max().item()  # noqa: E731
    assert err(merged) < err(probed) / 3


def test_keys_added_between_searches_are_slotted_in_as_a_fresh_sort_would():
    rng = np.random.default_rng(3)
    ix = WhitenedIVF(3, 16, cluster_size=16, scan=0.3)
    ix.learn(rng.normal(size=(3, 500, 16)))
    ix.add(rng.normal(size=(3, 300, 16)).astype(np.float32))  # past MIN_BUILD: trained
    inserted = 0
    for step in range(60):  # decode-like: a small block, then a search; drifting keys make splits too
        ix.add((rng.normal(size=(3, 8, 16)) + step * 0.05).astype(np.float32))
        q = rng.normal(size=(3, 2, 16)).astype(np.float32)
        inserted += ix.order is not None  # not invalidated: the block was slotted in
        cand = ix.candidates(q)[0]
        kept = ix.order.copy(), ix.starts.copy(), ix.mean.copy(), ix.var.copy()
        ix._sort()
        np.testing.assert_array_equal(kept[0], ix.order)
        np.testing.assert_array_equal(kept[1], ix.starts)
        np.testing.assert_allclose(kept[2], ix.mean, atol=1e-5)
        np.testing.assert_allclose(kept[3], ix.var, atol=1e-4)
        np.testing.assert_array_equal(cand, ix.candidates(q)[0])
    assert inserted > 20 and ix.centroids.shape[1] > 30  # both paths ran: inserts and splits


def test_partial_ranking_probes_the_clusters_a_full_sort_would(monkeypatch):
    rng = np.random.default_rng(4)
    ix = WhitenedIVF(2, 16, cluster_size=16, scan=0.02)
    ix.learn(rng.normal(size=(2, 500, 16)))
    ix.add(rng.normal(size=(2, 8000, 16)).astype(np.float32))
    q = rng.normal(size=(2, 3, 16)).astype(np.float32)
    got = ix.candidates(q)

    def full_sort(score, counts, want):
        rank = np.argsort(-score, axis=1)
        return rank, np.take_along_axis(counts, rank, 1)

    monkeypatch.setattr(WhitenedIVF, "_ranked", staticmethod(full_sort))
    want = ix.candidates(q)
    assert got[0].shape[1] < 8000 // 10  # a small share was probed: the partial sort was used
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_array_equal(np.sort(a, 1), np.sort(b, 1))

def test_a_spread_cluster_ranks_above_a_tight_one_of_a_slightly_higher_mean():
    rng = np.random.default_rng(3)
    e, f = np.eye(16, dtype=np.float32)[0], np.eye(16, dtype=np.float32)[1]
    tight = 1.1 * e + 5 * f + 0.01 * rng.normal(size=(160, 16)).astype(np.float32)
    spread = 1.0 * e - 5 * f + 0.01 * rng.normal(size=(160, 16)).astype(np.float32)
    spread[:, 0] += 2 * rng.normal(size=160)  # along the query: some of its keys score far higher
    ix = WhitenedIVF(1, 16, cluster_size=160, scan=0.3, whiten=False)
    ix.add(np.concatenate([tight, spread])[None])
    cand, valid, _, _ = ix.candidates(e[None, None])
    assert set(cand[0][valid[0]]) == set(range(160, 320))  # one cluster fits the scan: the spread one


def _run(model, ids, tokens, top_k=None, layers=None):
    ex = model.executor
    cache = ex.new_cache()
    cache.top_k = top_k
    try:
        steps = [ex.forward(ids, cache, last_only=True)[:, -1]]
        for i in range(NEW - 1):
            steps.append(ex.forward(tokens[:, T + i:T + i + 1], cache)[:, -1])
        if layers is not None:
            layers.extend(cache[i] for i in range(len(cache.layers)))
        return torch.stack(steps, 1), cache.tier_blocks(), cache.scanned_fraction(), model.accountant.snapshot()
    finally:
        cache.free()


def _reference(tmp_path, seed):
    """A tiny llama checkpoint, a prompt batch [2, T] and transformers' greedy answer with its logits."""
    model_dir, hf = tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(2, VOCAB - 1, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0, eos_token_id=EOS, output_logits=True,
                          return_dict_in_generate=True)
    return model_dir, ids, out


@pytest.mark.parametrize("device", ["cpu", "fake-gpu"])
def test_retrieval_with_every_key_is_exact(tmp_path, monkeypatch, device):
    model_dir, ids, out = _reference(tmp_path, seed=1)
    monkeypatch.setattr(retrieval, "TOP_K", 1000)  # more than the off-device keys: the merge must be exact
    model = load_offloaded(model_dir, device=device, attention="retrieval", kv_budget=80_000)
    logits, tiers, scanned, mem = _run(model, ids, out.sequences)
    assert sum(n for t, n in tiers.items() if t != model.plan.compute) > 0
    assert (logits - torch.stack(out.logits, 1)).abs().max().item() <= 1e-4
    assert mem["cpu"]["kv_index_bytes"] > 0  # the index is accounted ...
    assert model.accountant.snapshot()["cpu"]["kv_index_bytes"] == 0  # ... and given back with the cache
    assert not over_budget(model)


def test_every_scanned_key_is_attended_exact_in_memory_and_from_the_4bit_copy_on_disk(tmp_path, monkeypatch):
    model_dir, ids, out = _reference(tmp_path, seed=2)
    ref = torch.stack(out.logits, 1)
    monkeypatch.setattr(retrieval, "TOP_K", 2)  # far fewer than the off-device keys (the index scans all of them)
    gpu = load_offloaded(model_dir, device="fake-gpu", attention="retrieval", kv_budget=80_000)
    logits, tiers, _, _ = _run(gpu, ids, out.sequences)
    assert tiers.get("cpu", 0) > 0 and not tiers.get("disk")  # off the device, in RAM: every V row exact
    assert (logits - ref).abs().max().item() <= 1e-4
    cpu = load_offloaded(model_dir, device="cpu", attention="retrieval", kv_budget=80_000)
    layers = []
    logits, tiers, _, mem = _run(cpu, ids, out.sequences, layers=layers)
    assert tiers.get("disk", 0) > 0  # on disk: the best 2 per head read exact, the other scanned keys 4-bit
    scanned_err = (logits - ref).abs().max().item()
    assert mem["cpu"]["kv_index_bytes"] >= sum(l.ann.nbytes() + l.low.nbytes() for l in layers) > 0
    top_only, _, _, _ = _run(cpu, ids, out.sequences, top_k=2)  # the old path: the best 2 keys per head, nothing else
    top_err = (top_only - ref).abs().max().item()
    assert scanned_err < top_err / 4, (scanned_err, top_err)


def test_retrieval_generates_through_load_offloaded(tmp_path, monkeypatch):
    model_dir, _ = tiny_checkpoint(tmp_path, "qwen3")
    monkeypatch.setattr(retrieval, "TOP_K", 3)
    model = load_offloaded(model_dir, device="cpu", attention="retrieval", kv_budget="40KB")
    ids = torch.randint(2, VOCAB - 1, (1, 60), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out.shape == (1, 80)
    with pytest.raises(HeteroError, match="attention 'sparse'"):
        load_offloaded(model_dir, device="cpu", attention="sparse")


def test_too_long_context_is_refused(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "llama", max_position_embeddings=64)
    model = load_offloaded(model_dir, device="cpu", attention="retrieval")
    with pytest.raises(HeteroError, match="exceeds the 64-token limit"):
        model.generate(torch.randint(2, VOCAB - 1, (1, 60)), max_new_tokens=10, min_new_tokens=10)


def _hetero(*args):
    return subprocess.run([sys.executable, "-m", "hetero", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_attention_flag(smollm2_dir):
    base = ["run", smollm2_dir, "--device", "cpu", "--max-tokens", "4", "--quiet", "--prompt", "Name a colour."]
    retr = _hetero(*base, "--attention", "retrieval", "--kv-budget", "40MB")
    assert retr.returncode == 0 and retr.stdout.strip(), retr.stderr
    small = _hetero(*base, "--attention", "retrieval", "--kv-budget", "2MB")
    assert small.returncode == 2 and small.stderr.startswith("error:") and "recent window" in small.stderr
