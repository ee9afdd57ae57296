"""Expert caches: replacement policies, slots reserved before use, slot budgets in the Plan, and budgets kept."""

import dataclasses

import numpy as np
import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.experts.cache import Entry, ExpertCache
from hetero.experts import policy
from hetero.experts.policy import make_policy
from hetero.placement.greedy import default_expert_cache, greedy_plan, minimum_bytes
from hetero.placement.plan import Plan, expert_slot_bytes, plan_table, predictor_bytes, tier_usage, validate
from hetero.runtime.memory import Accountant, BudgetExceeded

from helpers import model_groups, over_budget, tiny_checkpoint
from plan_helpers import synthetic_profile


# ---------------------------------------------------------------- policies

def test_score_policy_evicts_the_lowest_decayed_weighted_frequency():
    p = make_policy("score")
    p.touch((0, 1), 0.9)  # used once, long ago, with a high weight
    for _ in range(30):
        p.tick()
    p.touch((0, 2), 0.2)
    p.touch((0, 3), 0.3)
    assert p.victim([(0, 1), (0, 2), (0, 3)], set()) == (0, 1)  # 0.9 * 0.9**30 < 0.2
    p.touch((0, 2), 0.2)
    assert p.victim([(0, 2), (0, 3)], set()) == (0, 3)  # 0.4 > 0.3: frequency counts, weighted


def test_score_policy_gives_up_the_layer_just_run_before_the_next_one():
    p = make_policy("score", layers=[0, 1, 2, 3])
    for _ in range(5):  # experts (1, 0) and (2, 0) are used as often, every token
        for layer in range(4):
            p.touch((layer, 0), 0.5)
        p.tick()
    p.touch((0, 1), 0.5)
    p.touch((1, 1), 0.5)  # the cycle is at layer 1: layer 2 comes next, layer 1 only after a whole token
    assert p.wait((1, 0)) > p.wait((2, 0))
    assert p.victim([(1, 0), (2, 0)], set()) == (1, 0)
    rare = make_policy("score", layers=[0, 1])
    rare.touch((0, 0), 1.0), rare.touch((1, 0), 1.0), rare.tick()
    for _ in range(20):
        rare.touch((1, 0), 1.0), rare.tick()  # (1, 0) every token, (0, 0) once, long ago
    rare.touch((0, 5), 1.0)  # the cycle is at layer 0 now: (1, 0) is next, and (0, 0) is rare anyway
    assert rare.victim([(0, 0), (1, 0)], set()) == (0, 0)


@pytest.mark.parametrize("vector_min", [10**9, 0], ids=["loop", "numpy"])
def test_score_policy_victim_is_the_ranking_it_documents(monkeypatch, vector_min):
    # victim() is inlined for speed (a loop for small caches, numpy for big ones): either must pick what
    # the lowest (-wait, score, key) picks
    monkeypatch.setattr(policy, "VECTOR_MIN", vector_min)
    rng = np.random.default_rng(0)
    for prior, layers in ((None, None), ({l: rng.random(8) for l in range(4)}, range(4))):
        p = make_policy("score", prior, layers)
        for i in range(2000):
            p.touch((int(rng.integers(4)), int(rng.integers(8))), float(rng.random()))
            if i % 7 == 0:
                p.tick()
            resident = list({(int(rng.integers(5)), int(rng.integers(8))) for _ in range(20)})
            protected = set(resident[:3])
            free = [k for k in resident if k not in protected]
            assert p.victim(resident, protected) == min(free, key=lambda k: (-p.wait(k), p.score(k), k))


def test_protected_keys_are_never_victims():
    for name in ("score", "lru", "static"):
        p = make_policy(name, {0: [0.1, 0.9, 0.5]})
        for e in range(3):
            p.touch((0, e), 1.0)
        assert p.victim([(0, 0), (0, 1), (0, 2)], {(0, 0)}) != (0, 0)
        assert p.victim([(0, 0), (0, 1)], {(0, 0), (0, 1)}) is None


def test_lru_and_static_policies():
    lru = make_policy("lru")
    for e in (0, 1, 2, 0):
        lru.touch((3, e), 1.0)
    assert lru.victim([(3, 0), (3, 1), (3, 2)], set()) == (3, 1)
    static = make_policy("static", np.array([[0.5, 0.1, 0.4], [0.2, 0.2, 0.6]]), layers=[1, 3])
    assert static.victim([(1, 0), (1, 2), (3, 0)], set()) == (3, 0)  # frequency 0.2 at layer 3
    with pytest.raises(HeteroError, match="frequencies"):
        make_policy("static")
    with pytest.raises(HeteroError, match="choose score, lru or static"):
        make_policy("mru")


# ---------------------------------------------------------------- the cache

def test_cache_reserves_every_slot_before_use_and_evicts_by_policy():
    acc = Accountant({"cpu": 1000})
    dropped = []
    cache = ExpertCache("cpu", 3, 300, acc, make_policy("lru"), dropped.append)
    assert acc.snapshot()["cpu"]["expert_cache_bytes"] == 900
    with pytest.raises(BudgetExceeded):
        ExpertCache("cpu", 1, 300, acc, make_policy("lru"))  # 900 + 300 > 1000: refused before it exists
    for e in range(3):
        assert cache.make_room(set())
        cache.put((0, e), Entry(tensors=(), prefetched=e == 1))
        cache.policy.touch((0, e))
    assert not cache.make_room({(0, 0), (0, 1), (0, 2)})  # all protected: no slot
    assert cache.make_room({(0, 0)})  # evicts the least recently used unprotected key
    assert (0, 1) not in cache and cache.evictions == 1 and cache.wasted == 1  # a prefetch never used
    assert len(cache.entries) == 2 and len(dropped) == 1
    cache.close()
    assert acc.snapshot()["cpu"]["held_bytes"] == 0


def test_a_prefetch_never_pushes_out_an_expert_needed_sooner_nor_one_still_being_read():
    acc = Accountant({"cpu": None})
    cache = ExpertCache("cpu", 2, 100, acc, make_policy("score", layers=[0, 1, 2, 3]))
    for layer in (2, 3):  # two experts used every token, then the cycle stands at layer 3
        assert cache.make_room(set())
        cache.put((layer, 0), Entry(tensors=()))
    for _ in range(5):
        for layer in (2, 3):
            cache.policy.touch((layer, 0), 1.0)
        cache.policy.tick()
    victim_wait = max(cache.policy.wait(k) for k in cache.entries)
    # a prediction for layer 0 with chance 0.9: it waits 1 step + 10% of a long wait; evicting an expert
    # needed within ~2 steps for it would cost a read sooner than it saves one
    assert not cache.make_room(set(), admit_wait=victim_wait)
    assert cache.make_room(set(), admit_wait=victim_wait - 0.5) and len(cache.entries) == 1
    cache.put((0, 1), Entry(staged=object()))  # its reads are in flight: not a candidate
    cache.policy.touch((0, 1), 1.0)
    left = next(k for k in cache.entries if k != (0, 1))
    assert cache.make_room(set()) and (0, 1) in cache and left not in cache
    cache.put((1, 0), Entry(tensors=()))
    assert not cache.make_room({(1, 0)})  # the one unprotected entry is still being read
    cache.land((0, 1), ())  # landed: a candidate like any other
    assert cache.make_room({(1, 0)}) and (0, 1) not in cache and not cache.pending


# ---------------------------------------------------------------- slot budgets in the plan

@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    ckpt, _ = tiny_checkpoint(tmp_path_factory.mktemp("moe"), "mixtral", num_hidden_layers=3)
    args, groups = model_groups(ckpt)
    return ckpt, args, groups


def test_plan_round_trip_validation_and_usage(moe):
    _, args, groups = moe
    plan = greedy_plan(groups, args, torch.float32, {"cpu": None}, "cpu", 256)
    tiers = {g.name: ("disk" if g.kind == "expert" else t) for g, t in zip(groups, plan.tiers.values())}
    plan = dataclasses.replace(plan, tiers=tiers, expert_cache={"cpu": 5})
    assert Plan.from_json(plan.to_json()) == plan and Plan.from_json(plan.to_json()).expert_cache == {"cpu": 5}
    rows = plan_table(plan, groups)  # the load-time table shows the caches, before lm_head
    assert rows[-2][:2] == ("expert caches", "cpu 5 slots") and rows[-1][0] == "lm_head"
    slot = expert_slot_bytes(groups)
    use = tier_usage(groups, plan, args, torch.float32)
    assert use["cpu"]["expert_cache"] == 5 * slot["cpu"] + predictor_bytes(groups, args)
    none = tier_usage(groups, dataclasses.replace(plan, expert_cache={}), args, torch.float32)
    assert none["cpu"]["expert_cache"] == 0
    budget = sum(use["cpu"].values())
    validate(dataclasses.replace(plan, budgets={"cpu": budget}), groups, args, torch.float32, False)
    with pytest.raises(HeteroError, match="expert cache"):  # the cache counts in the budget check
        validate(dataclasses.replace(plan, budgets={"cpu": budget - 1}), groups, args, torch.float32, False)
    with pytest.raises(HeteroError, match="expert_cache"):
        Plan.from_json(plan.to_json().replace('"cpu": 5', '"cpu": -1'))
    with pytest.raises(HeteroError, match="gpu expert cache"):
        validate(dataclasses.replace(plan, expert_cache={"gpu": 1}), groups, args, torch.float32, False)


def test_greedy_takes_a_default_cache_from_the_budget_only_when_experts_do_not_fit(moe):
    _, args, groups = moe
    total = sum(g.nbytes for g in groups)
    need = minimum_bytes(groups, args, torch.float32, "cpu", 256)["cpu"]
    roomy = greedy_plan(groups, args, torch.float32, {"cpu": need + 2 * total}, "cpu", 256, fixed_context=True)
    assert roomy.expert_cache == {} and "disk" not in roomy.tiers.values()
    budget = need + total // 2
    tight = greedy_plan(groups, args, torch.float32, {"cpu": budget}, "cpu", 256, fixed_context=True)
    assert any(t == "disk" for t in tight.tiers.values())
    at_depth = minimum_bytes(groups, args, torch.float32, "cpu", 256, tight.depth)["cpu"]  # what the plan reserves
    slots = default_expert_cache(groups, args, "cpu", {"cpu": budget - at_depth, "gpu": 0})["cpu"]
    assert tight.expert_cache == {"cpu": slots} and slots >= 1
    use = tier_usage(groups, tight, args, torch.float32)
    assert use["cpu"]["expert_cache"] > 0 and sum(use["cpu"].values()) <= budget
    # asked for: slots, a size, none; too large a cache is refused in one line
    assert greedy_plan(groups, args, torch.float32, {"cpu": budget}, "cpu", 256, True, expert_cache=2).expert_cache == {"cpu": 2}
    slot = expert_slot_bytes(groups)["cpu"]
    sized = greedy_plan(groups, args, torch.float32, {"cpu": budget}, "cpu", 256, True, expert_cache=str(3 * slot + 5))
    assert sized.expert_cache == {"cpu": 3}
    assert greedy_plan(groups, args, torch.float32, {"cpu": budget}, "cpu", 256, True, expert_cache=0).expert_cache == {}
    with pytest.raises(HeteroError, match="expert cache of 1000 slots"):
        greedy_plan(groups, args, torch.float32, {"cpu": budget}, "cpu", 256, True, expert_cache=1000)


def test_without_a_trace_the_cache_takes_what_the_dense_groups_leave_and_a_trace_ranks_hot_experts_first(moe):
    """Under the uniform prior the dense groups (read by every token) stay in RAM and the rest of the
    room is expert cache, not homes fixed by an arbitrary order; with frequencies the hot experts are
    homed in RAM first and the cache is the small share."""
    _, args, groups = moe
    assert not args.tie_word_embeddings  # an untied embedding is only gathered row by row: left on disk
    dense = sum(g.nbytes for g in groups if g.kind not in ("expert", "norms", "embed"))
    experts = [g for g in groups if g.kind == "expert"]
    slot = expert_slot_bytes(groups)["cpu"]
    need = minimum_bytes(groups, args, torch.float32, "cpu", 256, 4)["cpu"]
    budget = need + dense + len(experts) * slot // 2
    plan = greedy_plan(groups, args, torch.float32, {"cpu": budget}, "cpu", 256, fixed_context=True)
    assert all(plan.tiers[g.name] == "cpu" for g in groups if g.kind not in ("expert", "embed"))
    homed = sum(plan.tiers[g.name] == "cpu" for g in experts)
    assert plan.expert_cache["cpu"] >= len(experts) // 2 - 1 and homed <= 1, (plan.expert_cache, homed)
    assert sum(tier_usage(groups, plan, args, torch.float32)["cpu"].values()) <= budget
    E, moe_layers = args.num_experts, sorted({g.layer for g in experts})
    freq = np.tile(np.arange(E) / E, (len(moe_layers), 1))  # the last expert hottest: against execution order
    known = greedy_plan(groups, args, torch.float32, {"cpu": budget}, "cpu", 256, fixed_context=True, expert_freq=freq)
    assert known.expert_cache["cpu"] < plan.expert_cache["cpu"]
    ram = [freq[moe_layers.index(g.layer), g.expert] for g in experts if known.tiers[g.name] == "cpu"]
    disk = [freq[moe_layers.index(g.layer), g.expert] for g in experts if known.tiers[g.name] == "disk"]
    assert ram and disk and min(ram) >= max(disk), (ram, disk)  # in execution order expert 0, the coldest, came first


def test_gpu_plans_cache_on_both_tiers_within_budgets(moe):
    _, args, groups = moe
    need = minimum_bytes(groups, args, torch.float32, "gpu", 256)
    total = sum(g.nbytes for g in groups)
    budgets = {"gpu": need["gpu"] + total // 4, "cpu": need["cpu"] + total // 4}
    plan = greedy_plan(groups, args, torch.float32, budgets, "gpu", 256, fixed_context=True)
    assert set(plan.expert_cache) == {"gpu", "cpu"}
    validate(plan, groups, args, torch.float32, True)


@pytest.mark.parametrize("device,planner", [("cpu", "greedy"), ("fake-gpu", "greedy"), ("fake-gpu", "cost")])
def test_loaded_caches_hold_their_slots_and_never_exceed_the_budgets(moe, device, planner):
    ckpt, args, groups = moe
    compute = "gpu" if device == "fake-gpu" else "cpu"
    need = minimum_bytes(groups, args, torch.float32, compute, 256)
    total = sum(g.nbytes for g in groups)
    m = hetero.load_offloaded(ckpt, ram=need["cpu"] + total // 3, vram=need.get("gpu", 0) + total // 3, context=256,
                              device=device, planner=planner, profile=synthetic_profile())
    assert any(m.plan.expert_cache.values())
    slot = expert_slot_bytes(groups, None)
    snap = m.accountant.snapshot()
    for t, n in m.plan.expert_cache.items():
        assert snap[t]["expert_cache_bytes"] == n * slot[t]
    m.generate(torch.tensor([[5, 6, 7, 8, 9, 10]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert not over_budget(m), over_budget(m)
    s = m.stats()["experts"]
    assert s["cache_slots"] == m.plan.expert_cache and s["policy"] == "score"
