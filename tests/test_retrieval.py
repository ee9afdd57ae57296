"""Retrieval attention: the query-aware index finds planted keys, retrieval with top-k covering every
off-device key is exact attention, and it runs end to end through load_offloaded and the CLI."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from hetero.api import load_offloaded
from hetero.errors import HeteroError
from hetero.kvstore import paged, retrieval
from hetero.kvstore.ann import FlatIndex, QueryRoutedIndex

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


def _planted(n=4096, d=64, targets=64, seed=0):
    """Keys from one projection, queries from another: each query's best key is a planted one it was made for."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)).astype(np.float32) + 2.0  # keys share a mean direction queries do not
    planted = rng.choice(n, targets, replace=False)
    proj = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)  # queries live in a rotated frame

    def queries(m):
        t = rng.choice(planted, m)
        q = (keys[t] - 2.0) @ proj @ proj.T * 3 + rng.normal(size=(m, d)).astype(np.float32) * 0.3
        return q.astype(np.float32), t

    return keys, queries


def test_query_aware_index_finds_planted_keys_scanning_few():
    keys, queries = _planted()
    ix, flat = QueryRoutedIndex(64, clusters=32, links=16, nprobe=2), FlatIndex(64)
    learned, _ = queries(1024)
    ix.learn(learned)
    for part in np.array_split(keys, 16):  # added block by block, as the cache does
        ix.add(part)
        flat.add(part)
    q, target = queries(200)
    ids, scanned = zip(*(ix.search(q[i:i + 1], 10) for i in range(len(q))))
    exact, _ = flat.search(q, 10)
    hit = np.mean([target[i] in ids[i][0] for i in range(len(q))])
    recall = np.mean([len(set(ids[i][0]) & set(exact[i])) / 10 for i in range(len(q))])
    assert hit >= 0.95, hit
    assert recall >= 0.8, recall
    assert np.mean(scanned) / len(keys) <= 0.25
    assert ix.nbytes() <= 1.5 * keys.nbytes


def _run(model, ids, tokens):
    ex = model.executor
    cache = ex.new_cache()
    try:
        steps = [ex.forward(ids, cache, last_only=True)[:, -1]]
        for i in range(NEW - 1):
            steps.append(ex.forward(tokens[:, T + i:T + i + 1], cache)[:, -1])
        return torch.stack(steps, 1), cache.tier_blocks(), cache.scanned_fraction(), model.accountant.snapshot()
    finally:
        cache.free()


@pytest.mark.parametrize("device", ["cpu", "fake-gpu"])
def test_retrieval_with_every_key_is_exact(tmp_path, monkeypatch, device):
    model_dir, hf = tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(2, VOCAB - 1, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0, eos_token_id=EOS, output_logits=True,
                          return_dict_in_generate=True)
    monkeypatch.setattr(retrieval, "TOP_K", 1000)  # more than the off-device keys: the merge must be exact
    model = load_offloaded(model_dir, device=device, attention="retrieval", kv_budget=80_000)
    logits, tiers, scanned, mem = _run(model, ids, out.sequences)
    assert sum(n for t, n in tiers.items() if t != model.plan.compute) > 0
    assert (logits - torch.stack(out.logits, 1)).abs().max().item() <= 1e-4
    assert mem["cpu"]["kv_index_bytes"] > 0  # the index is accounted ...
    assert model.accountant.snapshot()["cpu"]["kv_index_bytes"] == 0  # ... and given back with the cache
    assert not over_budget(model)


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
