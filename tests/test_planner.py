"""The cost-model planner: optimal on instances small enough to enumerate, within budgets always, never worse than greedy."""

import itertools
import json
import random

import pytest

from hetero.errors import HeteroError
from hetero.placement.cost import Workload, predict, tables
from hetero.placement.greedy import greedy_plan, minimum_bytes
from hetero.placement.plan import Plan, tier_usage, validate
from hetero.placement.planner import plan_model

from plan_helpers import synthetic_profile, tiny_desc

WORKLOAD = Workload(prompt_tokens=32, new_tokens=32)


def _fits(desc, plan) -> bool:
    use = tier_usage(list(desc.groups), plan, desc.args, desc.dtype)
    return all(plan.budgets.get(t) is None or sum(use[t].values()) <= plan.budgets[t] for t in ("gpu", "cpu"))


def _brute_force(desc, profile, budgets, compute, context):
    """The best decode time over every placement that fits (norms stay on the compute tier, as always)."""
    base = greedy_plan(list(desc.groups), desc.args, desc.dtype, budgets, compute, context, expert_cache={})
    tabs = tables(desc, profile, WORKLOAD, compute)
    movable = [g.name for g in desc.groups if g.kind != "norms"]
    best = None
    for combo in itertools.product(("gpu", "cpu", "disk") if compute == "gpu" else ("cpu", "disk"), repeat=len(movable)):
        tiers = {g.name: compute for g in desc.groups} | dict(zip(movable, combo))
        plan = Plan(tiers=tiers, compute=compute, budgets=base.budgets, kv_tokens=base.kv_tokens, depth=base.depth,
                    expert_cache=base.expert_cache)  # the expert caches are taken before homes are placed
        if _fits(desc, plan):
            s = predict(desc, plan, profile, WORKLOAD, tabs).decode_s_per_token
            best = s if best is None else min(best, s)
    return best


@pytest.mark.parametrize("compute,model", [("cpu", dict(model_type="mixtral", layers=1, experts=6)),
                                           ("gpu", dict(model_type="llama", layers=2)),
                                           ("gpu", dict(model_type="mixtral", layers=1, experts=3))])
def test_within_one_percent_of_brute_force(compute, model):
    desc = tiny_desc(**model)
    profile = synthetic_profile(gpu=compute == "gpu")
    rng = random.Random(7)
    need = minimum_bytes(list(desc.groups), desc.args, desc.dtype, compute, 256)
    for _ in range(10):  # from the minimum working set to everything fitting
        budgets = {t: need[t] + rng.randint(0, desc.total_bytes) if t in need else None for t in ("gpu", "cpu")}
        # no expert cache (greedy_plan's default reserves one for MoE models): placements alone are compared
        # tie=0: the optimiser's own plan (by default greedy's is kept within the model's error)
        plan = plan_model(desc, budgets, compute, 256, profile, WORKLOAD, fixed_context=True, expert_cache={}, tie=0.0)
        ours = predict(desc, plan, profile, WORKLOAD).decode_s_per_token
        best = _brute_force(desc, profile, budgets, compute, 256)
        assert ours <= best * 1.01, (budgets, ours, best)


@pytest.mark.parametrize("compute", ["cpu", "gpu"])
def test_budgets_are_never_exceeded_and_plans_beat_greedy(compute):
    desc = tiny_desc("mixtral", layers=3, experts=8)
    profile = synthetic_profile(gpu=compute == "gpu")
    groups, args, dtype = list(desc.groups), desc.args, desc.dtype
    rng = random.Random(0)
    total = desc.total_bytes
    for _ in range(60):
        budgets = {"cpu": rng.randint(0, 2 * total), "gpu": rng.randint(0, 2 * total) if compute == "gpu" else None}
        context = rng.choice([256, 1024])
        try:
            plan = plan_model(desc, budgets, compute, context, profile, WORKLOAD)
        except HeteroError as e:
            need = minimum_bytes(groups, args, dtype, compute, 256)
            assert any(budgets[t] is not None and need[t] > budgets[t] for t in need), e
            assert "minimum working set" in str(e) and "raise" in str(e)
            continue
        validate(plan, groups, args, dtype, has_gpu=compute == "gpu")
        assert _fits(desc, plan)
        greedy = greedy_plan(groups, args, dtype, budgets, compute, context)
        assert plan.kv_tokens == greedy.kv_tokens  # the same context decisions as greedy
        ours, theirs = (predict(desc, p, profile, WORKLOAD).decode_s_per_token for p in (plan, greedy))
        assert ours <= theirs * (1 + 1e-9)


def test_value_per_byte_keeps_every_token_groups_before_rare_experts():
    """With room for a third of the model, lm_head and attention stay in RAM; experts (used 2 in 8) go to disk."""
    desc = tiny_desc("mixtral", layers=2, experts=8)
    profile = synthetic_profile()
    need = minimum_bytes(list(desc.groups), desc.args, desc.dtype, "cpu", 256)["cpu"]
    dense = sum(g.nbytes for g in desc.groups if g.kind in ("attn", "mlp", "lm_head"))
    plan = plan_model(desc, {"cpu": need + dense}, "cpu", 256, profile, WORKLOAD, fixed_context=True,
                      expert_cache={}, tie=0.0)  # no expert cache: the budget is for homes only; the optimiser's plan
    for g in desc.groups:
        if g.kind in ("attn", "lm_head"):
            assert plan.tiers[g.name] == "cpu", g.name
    assert plan.tiers["embed"] == "disk"  # untied: only one row is read per token
    assert sum(plan.tiers[g.name] == "disk" for g in desc.groups if g.kind == "expert") >= 8


def test_requested_context_is_kept_and_an_unrequested_one_shrinks():
    desc = tiny_desc("llama", layers=2)
    profile = synthetic_profile()
    groups = list(desc.groups)
    full = minimum_bytes(groups, desc.args, desc.dtype, "cpu", 1024)["cpu"]
    small = minimum_bytes(groups, desc.args, desc.dtype, "cpu", 256)["cpu"]
    budget = (full + small) // 2
    plan = plan_model(desc, {"cpu": budget}, "cpu", 1024, profile, WORKLOAD)
    assert 256 <= plan.kv_tokens < 1024
    with pytest.raises(HeteroError, match="minimum working set"):
        plan_model(desc, {"cpu": budget}, "cpu", 1024, profile, WORKLOAD, fixed_context=True)
    with pytest.raises(HeteroError, match=r"at least \d"):
        plan_model(desc, {"cpu": small // 2}, "cpu", 1024, profile, WORKLOAD)


def test_prefill_weight_trades_decode_for_prefill():
    desc = tiny_desc("mixtral", layers=2, experts=8)
    profile = synthetic_profile()
    long = Workload(prompt_tokens=512, new_tokens=8)
    budget = desc.total_bytes // 2
    plain = plan_model(desc, {"cpu": budget}, "cpu", 1024, profile, long, fixed_context=True)
    weighted = plan_model(desc, {"cpu": budget}, "cpu", 1024, profile, long, fixed_context=True, prefill_weight=1 / 8)

    def total(p):
        r = predict(desc, p, profile, long)
        return r.prefill_s + 8 * r.decode_s_per_token
    assert total(weighted) <= total(plain) * (1 + 1e-9)


def test_plan_json_round_trip(tmp_path):
    desc = tiny_desc("mixtral", layers=2, experts=4)
    plan = plan_model(desc, {"cpu": desc.total_bytes // 2, "gpu": desc.total_bytes // 3}, "gpu", 512,
                      synthetic_profile(gpu=True), WORKLOAD)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan and again.tiers == plan.tiers
    assert set(json.loads((tmp_path / "plan.json").read_text())["tiers"].values()) <= {"gpu", "cpu", "disk"}
    validate(again, list(desc.groups), desc.args, desc.dtype, has_gpu=True)


def test_load_offloaded_plans_by_cost_by_default_and_reports_a_prediction(tmp_path):
    import torch

    import hetero
    from hetero.placement.greedy import greedy_plan as greedy

    from helpers import model_groups, tiny_checkpoint

    ckpt, hf = tiny_checkpoint(tmp_path, "llama")
    args, groups = model_groups(ckpt)
    ram = minimum_bytes(groups, args, torch.float32, "cpu", 256)["cpu"] + sum(g.nbytes for g in groups) // 2
    profile = synthetic_profile()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    m = hetero.load_offloaded(ckpt, ram=ram, context=256, profile=profile, log_fn=lambda *_: None)
    g = hetero.load_offloaded(ckpt, ram=ram, context=256, planner="greedy", profile=profile, log_fn=lambda *_: None)
    assert g.plan == greedy(groups, args, torch.float32, {"cpu": ram}, "cpu", 256, fixed_context=True)
    assert "disk" in m.plan.tiers.values() and m.plan.tiers != g.plan.tiers
    with torch.no_grad():
        ref = hf(ids).logits
    for model in (m, g):
        assert (model(ids).logits - ref).abs().max() < 1e-4
    m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    s = m.stats()
    assert s["predicted_decode_s_per_token"] > 0 and s["decode_s_per_token"] > 0
    with pytest.raises(HeteroError, match="planner 'fastest'"):
        hetero.load_offloaded(ckpt, ram=ram, planner="fastest", profile=profile)


def test_hot_experts_from_a_routing_trace_get_the_faster_tier():
    """With routing frequencies (RoutingTrace.frequencies(): [n_moe_layers, E]), the experts a trace
    shows hot stay in RAM and the cold ones go to disk; under the uniform prior all look alike."""
    import numpy as np

    desc = tiny_desc("mixtral", layers=2, experts=8)
    profile = synthetic_profile()
    # top-2, rows sum to 2; the hot experts are not the first ones, where greedy's order would put them
    freq = np.array([[0.02, 0.6, 0.03, 0.5, 0.05, 0.4, 0.1, 0.3], [0.6, 0.02, 0.5, 0.03, 0.4, 0.05, 0.3, 0.1]])
    need = minimum_bytes(list(desc.groups), desc.args, desc.dtype, "cpu", 256)["cpu"]
    dense = sum(g.nbytes for g in desc.groups if g.kind != "expert")
    expert = next(g.nbytes for g in desc.groups if g.kind == "expert")
    budget = need + dense + 8 * expert  # room for half the experts
    plan = plan_model(desc, {"cpu": budget}, "cpu", 256, profile, Workload(32, 32, expert_freq=freq), fixed_context=True)
    for layer in (0, 1):
        tiers = [plan.tiers[f"layers.{layer}.experts.{e}"] for e in range(8)]
        ram = [freq[layer, e] for e in range(8) if tiers[e] == "cpu"]
        disk = [freq[layer, e] for e in range(8) if tiers[e] == "disk"]
        assert ram and disk, tiers
        assert min(ram) > max(disk), tiers  # every expert in RAM is hotter than every expert on disk
