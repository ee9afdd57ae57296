"""Expert prefetch and miss decisions: outputs never depend on them, reads surface errors, stats are measured."""

import dataclasses
import json

import pytest
import torch

import hetero
from hetero.api import checkpoint_tensors
from hetero.checkpoint.catalogue import Catalogue
from hetero.cli import main
from hetero.config import ModelArgs
from hetero.errors import HeteroError
from hetero.experts.decide import ExpertCosts
from hetero.flash import pack as packs
from hetero.placement.cost import lookahead
from hetero.placement import hardware
from hetero.placement.plan import tier_usage

from helpers import generate_in_thread, model_groups, over_budget, tiny_checkpoint
from plan_helpers import synthetic_profile
from test_pipeline import FailingReader

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# (compute, device, expert tiers dealt round robin, cache slots)
PLACEMENTS = [
    ("cpu", "cpu", ("disk",), {"cpu": 3}),
    ("gpu", "fake-gpu", ("cpu",), {"gpu": 3}),
    ("gpu", "fake-gpu", ("disk", "cpu", "gpu"), {"gpu": 2, "cpu": 2}),
]


def expert_plan(ckpt, compute: str, cycle, cache: dict, depth: int = 1, dtype=torch.float32, pack: str | None = None):
    """Dense groups on the compute tier, experts dealt to `cycle`, `cache` slots; budgets exactly what it commits
    (with disk-tier experts read from a pack of dtype `pack`, default one in the compute dtype)."""
    args, groups = model_groups(ckpt, dtype)
    experts = [g for g in groups if g.kind == "expert"]
    deal = {g.name: cycle[i % len(cycle)] for i, g in enumerate(experts)}
    tiers = {g.name: deal.get(g.name, compute) for g in groups}
    plan = hetero.api.Plan(tiers=tiers, compute=compute, budgets={}, kv_tokens=64, depth=depth, expert_cache=cache)
    extents = None
    if pack is not None:
        cat, fmt = Catalogue(ckpt), packs.PackFormat.parse(pack)
        tensors = checkpoint_tensors(args, cat)
        codecs = packs.codec_stats(cat, tensors, groups, fmt) if fmt.codec else None
        extents = packs.staging_extents(packs.layout(tensors, groups, fmt, codecs), dtype)
    use = tier_usage(groups, plan, args, dtype, extents)
    return dataclasses.replace(plan, budgets={t: sum(use[t].values()) for t in (("gpu", "cpu") if compute == "gpu" else ("cpu",))})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: tiny_checkpoint(root, f) for f in MOE}


@pytest.mark.parametrize("family", MOE)
def test_logits_identical_with_prefetch_on_and_off_and_to_the_resident_model(ckpts, family):
    ckpt, ref = ckpts[family]
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    resident = hetero.load_offloaded(ckpt, plan=expert_plan(ckpt, "cpu", ("cpu",), {}), profile=synthetic_profile())
    want = resident(ids).logits
    with torch.inference_mode():
        assert (want - ref(ids).logits).abs().max().item() <= 1e-4
    prompt = ids[:, :4]
    text = resident.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # one sequence decodes one token per step, through the dispatch's single-token path
    ex = resident.executor
    cache = ex.new_cache()
    try:
        steps = [ex.forward(ids[:, :4], cache)] + [ex.forward(ids[:, t:t + 1], cache) for t in range(4, 10)]
    finally:
        cache.free()
    assert (torch.cat(steps, dim=1) - want).abs().max().item() <= 1e-4
    for compute, device, cycle, cache in PLACEMENTS:
        for prefetch in (True, False):
            m = hetero.load_offloaded(ckpt, plan=expert_plan(ckpt, compute, cycle, cache), device=device,
                                      prefetch=prefetch, profile=synthetic_profile())
            assert torch.equal(m(ids).logits, want), (compute, cycle, prefetch)
            assert torch.equal(m.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False), text)
            assert not over_budget(m), over_budget(m)
            s = m.stats()["experts"]
            assert s["prefetch"] == prefetch and (s["predictor"] is not None) == prefetch
            if prefetch:
                assert s["recall_by_layer"] and 0 <= s["recall"] <= 1


class AllExperts:
    """A predictor naming every expert of the next MoE layer (score 1), to test the prefetch mechanics."""

    def __init__(self, layers, E):
        self.layers, self.E, self.lookahead, self.nbytes = layers, E, 1, 0

    def predict(self, layer, x):
        nxt = [l for l in self.layers if l > layer][:1]
        return {l: torch.ones(self.E) for l in nxt}


@pytest.mark.parametrize("compute,device,cycle,cache", [PLACEMENTS[0], PLACEMENTS[2]])
def test_experts_read_from_a_bf16z_pack_fill_the_caches_with_the_same_weights(tmp_path, compute, device, cycle, cache):
    ckpt, ref = tiny_checkpoint(tmp_path, "qwen3_moe")
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(6))
    bf16 = dict(dtype="bfloat16", profile=synthetic_profile(gpu=compute == "gpu"))
    resident = hetero.load_offloaded(ckpt, plan=expert_plan(ckpt, "cpu", ("cpu",), {}, dtype=torch.bfloat16), **bf16)
    plan = expert_plan(ckpt, compute, cycle, cache, dtype=torch.bfloat16, pack="bf16z")
    z = hetero.load_offloaded(ckpt, device=device, plan=plan, pack="bf16z", **bf16)
    assert z.executor.store.pack.format.tag == "bf16z"
    assert torch.equal(z(ids).logits.cpu(), resident(ids).logits)
    assert torch.equal(z.generate(ids[:, :4], max_new_tokens=5, do_sample=False),
                       resident.generate(ids[:, :4], max_new_tokens=5, do_sample=False))
    assert z.stats()["experts"]["disk_read_bytes_per_token"] > 0 and not over_budget(z)


def _hits(m, predictor=None):
    mgr = m.executor.experts
    if predictor is not None:
        mgr.predictor = predictor
    m.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    return m.stats()["experts"]


def test_prefetched_experts_are_hits_and_disk_reads_run_ahead(ckpts):
    ckpt, _ = ckpts["mixtral"]  # 2 MoE layers of 8 experts, top-2
    plan = expert_plan(ckpt, "cpu", ("disk",), {"cpu": 16})
    on = hetero.load_offloaded(ckpt, plan=plan, profile=synthetic_profile())
    s = _hits(on, AllExperts([0, 1], 8))
    off = _hits(hetero.load_offloaded(ckpt, plan=plan, prefetch=False, profile=synthetic_profile()))
    assert s["prefetched"]["cpu"] >= 8 and s["cache_hit_bytes"]["cpu"] > off["cache_hit_bytes"]["cpu"]
    # every use of layer 1 after the first token was prefetched while layer 0 computed
    assert s["hit_rate_by_bytes"]["cpu"] > off["hit_rate_by_bytes"]["cpu"]
    assert s["disk_read_bytes_per_token"] > 0 and s["stall_s"] >= 0 and s["miss_predicted_s"] > 0


def test_without_a_profile_misses_move_experts_into_the_gpu_cache(ckpts, monkeypatch):
    monkeypatch.setattr(hardware, "cached", lambda *a, **k: None)
    ckpt, ref = ckpts["olmoe"]
    m = hetero.load_offloaded(ckpt, plan=expert_plan(ckpt, "gpu", ("cpu", "disk"), {"gpu": 4, "cpu": 4}),
                              device="fake-gpu", planner="greedy")
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.inference_mode():
        assert (m(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4
    s = _hits(m)
    assert s["misses_computed_on"] == {"gpu": s["misses_computed_on"]["gpu"]} and s["lookahead"] == 1
    assert s["host_to_device_bytes_per_token"] > 0 and s["cache_hit_bytes"]["gpu"] > 0
    assert not over_budget(m)


def _fast_cpu_profile():
    """The synthetic gpu machine, with a CPU that streams weights faster than the link copies them."""
    p = synthetic_profile(gpu=True)
    cpu = dict(p.compute["cpu"], matvec={dt: [[512, 40e9], [4096, 40e9]] for dt in ("float32", "bfloat16", "float16")})
    return dataclasses.replace(p, compute={**p.compute, "cpu": cpu})


def test_miss_decision_flips_with_the_token_count():
    args = ModelArgs.from_dict(dict(model_type="mixtral", vocab_size=1000, hidden_size=1024, intermediate_size=2048,
                                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                                    num_local_experts=8, num_experts_per_tok=2))
    nbytes = 3 * 1024 * 2048 * 2
    costs = ExpertCosts(_fast_cpu_profile(), "gpu", "cuda", args, torch.bfloat16, nbytes, True)
    assert costs.decide("cpu", 1) == "cpu"  # one decoded token: the weights are the cost, the CPU reads them faster
    assert costs.decide("cpu", 512) == "gpu"  # a long prefill: CPU matmul time grows with the tokens
    flip = next(n for n in range(1, 513) if costs.decide("cpu", n) == "gpu")
    assert all(costs.decide("cpu", n) == "gpu" for n in (flip, 2 * flip, 4 * flip))
    o = costs.options("disk", 1)
    assert o["cpu"] > costs.options("cpu", 1)["cpu"]  # a disk-homed expert pays its read either way
    assert costs.decide("disk", 1) == "cpu" and costs.decide("disk", 512) == "gpu"
    cpu_only = ExpertCosts(_fast_cpu_profile(), "cpu", None, args, torch.bfloat16, nbytes, True)
    assert set(cpu_only.options("disk", 4)) == {"cpu"}


def test_lookahead_is_the_miss_time_over_the_layer_time_clamped_or_one_when_transfers_bound():
    assert lookahead(0.5e-3, 1e-3) == 1
    assert lookahead(2.5e-3, 1e-3) == 3
    assert lookahead(50e-3, 1e-3) == 3
    assert lookahead(0.0, 1e-3) == 1
    assert lookahead(50e-3, 1e-3, transfer_bound=True) == 1  # reads are the bottleneck: no idle disk time to fill


def test_a_plan_bound_by_its_reads_prefetches_one_layer_ahead(ckpts):
    ckpt, _ = ckpts["mixtral"]
    plan = expert_plan(ckpt, "cpu", ("disk",), {"cpu": 8})
    slow = synthetic_profile()
    slow = dataclasses.replace(slow, disk_read={m: [[b, b / (b / 1e6 + 1e-3)] for b, _ in rows]
                                                for m, rows in slow.disk_read.items()})  # 1 MB/s
    # each miss takes far longer than a layer computes, so the latency rule alone would say 3 ahead;
    # but then the disk is the bottleneck, with no idle time for earlier reads to fill
    assert lookahead(50e-3, 1e-3) == 3
    m = hetero.load_offloaded(ckpt, plan=plan, profile=slow)
    assert m.executor.experts.lookahead == 1 and m.stats()["experts"]["lookahead"] == 1


def test_an_io_error_during_an_expert_prefetch_surfaces_and_frees_buffers(ckpts):
    ckpt, _ = ckpts["mixtral"]
    m = hetero.load_offloaded(ckpt, plan=expert_plan(ckpt, "cpu", ("disk",), {"cpu": 16}), profile=synthetic_profile())
    mgr = m.executor.experts
    mgr.predictor = AllExperts([0, 1], 8)
    store = m.executor.store
    good = store.reader
    store.reader = FailingReader(store.pack.extents["layers.1.experts.5"]["offset"])  # into a cache slot, ahead
    result = generate_in_thread(m)
    assert not result["hung"], "generate hung after an I/O error"
    assert isinstance(result.get("error"), HeteroError) and "layers.1.experts.5" in str(result["error"])
    assert not any(e.pending for e in mgr.caches["cpu"].entries.values())  # reads waited for, entries given up
    assert m.accountant.snapshot()["cpu"].get("staging_bytes", 0) == 0 and store.pipe.staged == {}
    store.reader = good
    assert m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2).shape == (1, 5)


def _word_tokenizer(model_dir):
    """A word-level tokenizer.json over the tiny models' 300 ids, so `hetero run --prompt` can encode text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 299)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model_dir / "tokenizer.json"))


def test_cli_no_prefetch_expert_cache_and_stats(ckpts, capsys):
    ckpt, _ = ckpts["qwen3_moe"]
    _word_tokenizer(ckpt)
    plan = expert_plan(ckpt, "cpu", ("disk",), {"cpu": 2})
    plan = dataclasses.replace(plan, budgets={"cpu": plan.budgets["cpu"] + 2**20})  # room for --expert-cache 5
    path = ckpt / "plan.json"
    plan.save(path)
    args = ["run", str(ckpt), "--plan", str(path), "--prompt", "w5 w7 w9", "--max-tokens", "3", "--json"]
    main(args + ["--no-prefetch", "--expert-cache", "5"])
    out = json.loads(capsys.readouterr().out)
    e = out["experts"]
    assert e["prefetch"] is False and e["cache_slots"] == {"cpu": 5} and e["tokens"] > 0
    assert {"hit_rate_by_bytes", "disk_read_bytes_per_token", "stall_s_per_token", "recall_by_layer"} <= set(e)
    main(args + ["--expert-policy", "lru"])
    e = json.loads(capsys.readouterr().out)["experts"]
    assert e["prefetch"] is True and e["policy"] == "lru" and e["cache_slots"] == {"cpu": 2}
    main(["run", str(ckpt), "--plan", str(path), "--prompt", "w5", "--max-tokens", "2", "--stats", "-q"])
    assert "experts:" in capsys.readouterr().err
