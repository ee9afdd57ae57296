"""The paged KV store: exact attention over blocks on gpu / cpu / disk equals the contiguous cache and
transformers, the log-sum-exp merge is exact, and the KV budget is reserved per tier and kept."""

import pytest
import torch
import torch.nn.functional as F

from hetero.api import load_offloaded
from hetero.errors import HeteroError
from hetero.kvstore import paged
from hetero.kvstore.attention import Accumulator, causal_mask, merge, partial_attention

pytest.importorskip("transformers")

from helpers import EOS, VOCAB, over_budget, tiny_checkpoint  # noqa: E402

B, T, NEW = 2, 20, 40
BLOCK = 4  # tiny blocks: 60 tokens make 15 blocks per layer, most of them off the compute device
KV_TOKEN_BYTES = 2 * 2 * 16 * 4  # k and v, 2 kv heads, head dim 16, float32: one layer, one sequence


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(paged, "BLOCK_TOKENS", BLOCK)
    monkeypatch.setattr(paged, "STAGE_BLOCKS", 3)  # several staging rounds per step
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _budget(layers: int, tokens: int, head_dim: int = 16) -> int:
    """kv_budget bytes holding `tokens` per layer for B sequences, plus the staging buffer."""
    return B * KV_TOKEN_BYTES * head_dim // 16 * (layers * tokens + paged.STAGE_BLOCKS * BLOCK)


def _reference(tmp_path, family, **overrides):
    model_dir, hf = tiny_checkpoint(tmp_path, family, **overrides)
    ids = torch.randint(2, VOCAB - 1, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0, eos_token_id=EOS, output_logits=True,
                          return_dict_in_generate=True)
    return model_dir, ids, out.sequences, torch.stack(out.logits, 1)  # logits [B, NEW, V]


def _decode_logits(model, ids, tokens):
    """Prefill `ids`, then feed transformers' greedy tokens one by one: the next-token logits [B, NEW, V]."""
    ex = model.executor
    cache = ex.new_cache()
    try:
        steps = [ex.forward(ids, cache, last_only=True)[:, -1]]
        for i in range(NEW - 1):
            steps.append(ex.forward(tokens[:, T + i:T + i + 1], cache)[:, -1])
        return torch.stack(steps, 1), cache.tier_blocks()
    finally:
        cache.free()


@pytest.mark.parametrize("family,device,ram,overrides", [
    ("llama", "cpu", None, {}),  # blocks spill from the compute tier (cpu) to disk
    ("llama", "fake-gpu", None, {}),  # gpu -> cpu until its KV budget is spent, then disk
    ("mistral", "cpu", None, {"sliding_window": 9}),  # a window shorter than the context, not block-aligned
])
def test_paged_exact_matches_transformers(tmp_path, family, device, ram, overrides):
    model_dir, ids, tokens, ref = _reference(tmp_path, family, **overrides)
    layers, head_dim = (3, 16) if family == "llama" else (2, 32)
    model = load_offloaded(model_dir, device=device, ram=ram, kv_budget=_budget(layers, 6 * BLOCK, head_dim))
    if device == "fake-gpu":
        # RAM's KV share is what the plan leaves free (plenty here): cut it to 5 blocks a layer so disk is used too
        model.executor.kv_cache.args[4]["cpu"] = layers * 5 * BLOCK * B * KV_TOKEN_BYTES
    logits, tiers = _decode_logits(model, ids, tokens)
    err = (logits - ref).abs().max().item()
    assert err <= 1e-4, f"max |Δlogit| {err:.2e}"
    off = {t: n for t, n in tiers.items() if t != model.plan.compute and n}
    assert off, f"no block left the compute tier: {tiers}"
    if device == "fake-gpu":
        assert off.get("cpu") and off.get("disk"), tiers
    assert not over_budget(model)


def test_paged_equals_contiguous_with_chunked_prefill(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "qwen2")
    ids = torch.randint(2, VOCAB - 1, (B, 50), generator=torch.Generator().manual_seed(2))
    exact = load_offloaded(model_dir, device="cpu")
    pagedm = load_offloaded(model_dir, device="cpu", kv_budget=_budget(2, 5 * BLOCK))
    outs = []
    for m in (exact, pagedm):
        cache = m.executor.new_cache()
        # chunks of several tokens after the first: multi-query attention over blocks already stored
        outs.append(torch.cat([m.executor.forward(ids[:, a:b], cache) for a, b in ((0, 13), (13, 30), (30, 31), (31, 50))], 1))
        cache.free()
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_kv_budget_is_reserved_per_tier_and_given_back(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "llama")
    budget = _budget(3, 6 * BLOCK)
    model = load_offloaded(model_dir, device="fake-gpu", kv_budget=budget)
    cache = model.executor.new_cache()
    model.executor.forward(torch.randint(2, VOCAB - 1, (B, 60)), cache)
    snap = model.accountant.snapshot()
    assert 0 < snap["gpu"]["kv_bytes"] <= budget
    assert snap["cpu"]["kv_bytes"] > 0  # the spill tier's arena
    assert cache.tier_blocks()["cpu"] > 0
    cache.free()
    snap = model.accountant.snapshot()
    assert snap["gpu"]["kv_bytes"] == snap["cpu"]["kv_bytes"] == 0
    assert not over_budget(model)


def test_budget_below_sinks_and_window_is_refused(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "llama")
    model = load_offloaded(model_dir, device="cpu", kv_budget=_budget(3, 2))
    with pytest.raises(HeteroError, match="cannot hold the attention sinks"):
        model(torch.randint(2, VOCAB - 1, (B, 8)))


def test_context_beyond_the_model_limit_is_an_error(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "llama", max_position_embeddings=64)
    with pytest.raises(HeteroError, match="supports 1 to 64"):
        load_offloaded(model_dir, device="cpu", kv_budget="1MB", context=65)
    model = load_offloaded(model_dir, device="cpu", kv_budget="1MB")
    with pytest.raises(HeteroError, match="exceeds the 64-token limit"):
        model(torch.randint(2, VOCAB - 1, (1, 65)))


def test_lse_merge_is_attention_over_the_union():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 3, 8)  # B, H, T, D with 3 kv heads (G = 2)
    k, v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    perm = torch.randperm(40)
    acc = Accumulator()
    for part in (perm[:7], perm[7:8], perm[8:]):  # uneven, one of a single key
        acc.add(*partial_attention(q, k[:, :, part], v[:, :, part], 0.3))
    assert (acc.o - ref).abs().max().item() < 1e-5
    full_o, full_lse = partial_attention(q, k, v, 0.3)
    assert (acc.lse - full_lse).abs().max().item() < 1e-5
    # a piece nobody may attend to (lse -inf) changes nothing, and two empty pieces give 0, not nan
    none = torch.zeros(3, 40, dtype=torch.bool)
    o_e, lse_e = partial_attention(q, k, v, 0.3, none)
    assert torch.isneginf(lse_e).all() and (o_e == 0).all()
    o, _ = merge(full_o, full_lse, o_e, lse_e)
    assert (o - full_o).abs().max().item() < 1e-6
    o, lse = merge(o_e, lse_e, o_e, lse_e)
    assert not o.isnan().any() and torch.isneginf(lse).all()


def test_causal_mask_with_window():
    m = causal_mask(torch.tensor([5]), torch.arange(8), window=3)
    assert m.tolist() == [[False, False, False, True, True, True, False, False]]


def test_a_paged_cache_holds_the_models_context_not_the_budgets(tmp_path):
    from types import SimpleNamespace

    from hetero.server_requests import ApiError, parse_sampling

    model_dir, _ = tiny_checkpoint(tmp_path, "qwen2")  # max_position_embeddings 256
    exact = load_offloaded(model_dir, device="cpu", context=64)
    pagedm = load_offloaded(model_dir, device="cpu", kv_budget=_budget(2, 5 * BLOCK))
    limited = load_offloaded(model_dir, device="cpu", kv_budget=_budget(2, 5 * BLOCK), context=100)
    assert exact.context_tokens == exact.plan.kv_tokens == 64
    assert pagedm.plan.kv_tokens < 100 and pagedm.context_tokens == 256 and limited.context_tokens == 100
    assert not any("context limited" in n for n in pagedm.notes)  # only the device's share is, and it pages
    # a sequence past the compute tier's share runs; one past the limit gets the cache's clear error
    ids = torch.randint(2, VOCAB - 1, (1, 101), generator=torch.Generator().manual_seed(3))
    cache = limited.executor.new_cache()
    limited.executor.forward(ids[:, :100], cache)
    with pytest.raises(HeteroError, match="exceeds the 100-token limit"):
        limited.executor.forward(ids[:, 100:], cache)
    cache.free()
    # the server (and the chat) budget a conversation by the same figure
    for m, n_prompt, ok in ((pagedm, pagedm.plan.kv_tokens + 10, True), (exact, 64, False)):
        stand_in = SimpleNamespace(context_tokens=m.context_tokens, generation_config={},
                                   tokenizer=SimpleNamespace(eos_token_ids=[EOS]))
        if ok:
            assert parse_sampling({}, stand_in, n_prompt, "messages").max_new_tokens == 256 - n_prompt
        else:
            with pytest.raises(ApiError):
                parse_sampling({}, stand_in, n_prompt, "messages")
