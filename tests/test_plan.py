"""Plans as data: JSON round trip, validation of hand-edited plans, and the greedy plan's budgets."""

import json
import random

import pytest
import torch

from hetero.config import ModelArgs
from hetero.errors import HeteroError
from hetero.models import family_for
from hetero.placement.greedy import greedy_plan, minimum_bytes
from hetero.placement.groups import make_groups
from hetero.placement.plan import Plan, plan_table, tier_usage, validate

ARGS = ModelArgs.from_dict(dict(
    model_type="mixtral", vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=1024,
))


def _tensors(args):
    C, I, D = args.hidden_size, args.intermediate_size, args.head_dim
    t = {"model.embed_tokens.weight": (args.vocab_size, C), "model.norm.weight": (C,), "lm_head.weight": (args.vocab_size, C)}
    for l in range(args.num_hidden_layers):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = (C,)
        t[p + "post_attention_layernorm.weight"] = (C,)
        for n, shape in [("q_proj", (args.num_attention_heads * D, C)), ("k_proj", (args.num_key_value_heads * D, C)),
                         ("v_proj", (args.num_key_value_heads * D, C)), ("o_proj", (C, args.num_attention_heads * D))]:
            t[p + f"self_attn.{n}.weight"] = shape
        t[p + "block_sparse_moe.gate.weight"] = (args.num_experts, C)
        for e in range(args.num_experts):
            for w, shape in [("w1", (I, C)), ("w2", (C, I)), ("w3", (I, C))]:
                t[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = shape
    return {n: (s, torch.float32) for n, s in t.items()}


@pytest.fixture(scope="module")
def groups():
    fam = family_for(ARGS)
    return make_groups(_tensors(ARGS), fam.EXPERT_PATTERN, torch.float32)


def test_groups_cover_every_expert_and_layer(groups):
    names = {g.name for g in groups}
    assert {"norms", "embed", "lm_head"} <= names
    for l in range(3):
        assert {f"layers.{l}.attn", f"layers.{l}.mlp"} <= names
        assert {f"layers.{l}.experts.{e}" for e in range(4)} <= names
    assert groups[0].name == "norms" and groups[-1].name == "lm_head"


def test_plan_json_round_trip(groups, tmp_path):
    plan = greedy_plan(groups, ARGS, torch.float32, {"cpu": 2_000_000}, "cpu", 512)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    assert json.loads(path.read_text())["tiers"] == plan.tiers


def test_hand_edited_plans_are_validated(groups, tmp_path):
    plan = greedy_plan(groups, ARGS, torch.float32, {"cpu": None}, "cpu", 512)
    d = json.loads(plan.to_json())
    bad = [
        ({**d, "tiers": {k: v for k, v in d["tiers"].items() if k != "layers.1.attn"}}, "no tier for"),
        ({**d, "tiers": {**d["tiers"], "layers.9.attn": "cpu"}}, "unknown group"),
        ({**d, "tiers": {**d["tiers"], "embed": "nvme"}}, "not one of gpu, cpu, disk"),
        ({**d, "tiers": {**d["tiers"], "embed": "gpu"}}, "gpu tier but computes on the cpu"),
        ({**d, "budgets": {"cpu": 1000}}, "budget is"),
        ({**d, "compute": "gpu"}, "no accelerator"),
    ]
    for doc, message in bad:
        with pytest.raises(HeteroError, match=message):
            validate(Plan.from_json(json.dumps(doc)), groups, ARGS, torch.float32, has_gpu=False)
    with pytest.raises(HeteroError, match="not a hetero plan"):
        Plan.from_json("{\"tiers\": 3}")
    with pytest.raises(HeteroError, match="not found"):
        Plan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("compute", ["cpu", "gpu"])
def test_greedy_plan_never_exceeds_its_budgets(groups, compute):
    rng = random.Random(0)
    total = sum(g.nbytes for g in groups)
    for _ in range(200):
        budgets = {"cpu": rng.randint(0, 2 * total), "gpu": rng.randint(0, 2 * total) if compute == "gpu" else None}
        try:
            plan = greedy_plan(groups, ARGS, torch.float32, budgets, compute, rng.choice([256, 1024]))
        except HeteroError as e:
            need = minimum_bytes(groups, ARGS, torch.float32, compute, 256)
            assert any(budgets[t] is not None and need[t] > budgets[t] for t in need), e
            assert "minimum working set" in str(e) and "raise" in str(e)
            continue
        validate(plan, groups, ARGS, torch.float32, has_gpu=compute == "gpu")
        for tier, use in tier_usage(groups, plan, ARGS, torch.float32).items():
            if budgets.get(tier) is not None:
                assert sum(use.values()) <= budgets[tier]


def test_greedy_shrinks_an_unrequested_context_and_keeps_a_requested_one(groups):
    need_full = minimum_bytes(groups, ARGS, torch.float32, "cpu", 1024)["cpu"]
    need_small = minimum_bytes(groups, ARGS, torch.float32, "cpu", 256)["cpu"]
    budget = (need_full + need_small) // 2
    plan = greedy_plan(groups, ARGS, torch.float32, {"cpu": budget}, "cpu", 1024)
    assert 256 <= plan.kv_tokens < 1024
    with pytest.raises(HeteroError, match="minimum working set"):
        greedy_plan(groups, ARGS, torch.float32, {"cpu": budget}, "cpu", 1024, fixed_context=True)


def test_everything_fits_without_budgets(groups):
    plan = greedy_plan(groups, ARGS, torch.float32, {"cpu": None}, "cpu", 512)
    assert set(plan.tiers.values()) == {"cpu"}
    rows = plan_table(plan, groups)
    assert rows[0][0] == "norms" and rows[-1][0] == "lm_head"
    assert any("experts:4 cpu" in r[1] for r in rows)
