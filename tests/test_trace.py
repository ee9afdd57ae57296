"""Routing traces: recording through the executor's observers, frequencies, safetensors round trip."""

import json

import numpy as np
import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.experts.trace import RoutingTrace, TraceRecorder
from helpers import spread_plan, tiny_checkpoint
from plan_helpers import synthetic_profile


def _toy(N=6, k=2, E=4, layers=(0, 2), x=True):
    rng = np.random.default_rng(0)
    idx = {l: np.stack([rng.permutation(E)[:k] for _ in range(N)]) for l in layers}
    w = {l: rng.random((N, k)).astype(np.float32) for l in layers}
    xs = {l: rng.standard_normal((N, 5)).astype(np.float16) for l in layers} if x else None
    return RoutingTrace(E, k, idx, w, xs, {"model": "toy", "expert_bytes": 123})


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_recorder_sees_every_token_of_every_moe_layer(tmp_path, family):
    model_dir, hf = tiny_checkpoint(tmp_path, family)
    m = hetero.load_offloaded(model_dir, plan=spread_plan(model_dir, ("cpu",)), dtype="float32")
    rec = TraceRecorder.for_model(m, keep_x=True)
    m.executor.routing_observers.append(rec)
    ids = torch.randint(0, m.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    m(ids[:, :3])
    m(ids[:, 3:])  # a second call appends: tokens in the order they ran
    tr = rec.trace()
    moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer, "block_sparse_moe")
           or type(layer.mlp).__name__.endswith("SparseMoeBlock")]
    assert tr.layers == moe and tr.num_tokens == 10 and tr.num_experts == m.config.num_experts
    assert tr.top_k == m.config.num_experts_per_tok and tr.meta["model_type"] == family
    for l in tr.layers:
        assert tr.idx[l].dtype == np.int16 and tr.w[l].dtype == np.float32 and tr.x[l].dtype == np.float16
        assert tr.x[l].shape == (10, m.config.hidden_size)
    # the recorded routing is what the HF reference routes on the same MoE inputs
    block = hf.model.layers[tr.layers[0]]
    block = getattr(block, "block_sparse_moe", None) or block.mlp
    logits = torch.from_numpy(tr.x[tr.layers[0]]).float() @ block.gate.weight.T
    want = torch.topk(logits, tr.top_k, dim=-1).indices.sort(-1).values
    got = torch.from_numpy(tr.idx[tr.layers[0]]).long().sort(-1).values
    assert (want == got).all(1).float().mean() >= 0.9  # x was kept in float16: near ties may flip
    freq = tr.frequencies()
    assert freq.shape == (len(moe), tr.num_experts)
    assert np.allclose(freq.sum(1), tr.top_k)  # every token picks k distinct experts


def test_recorder_without_x_and_empty():
    rec = TraceRecorder(num_experts=4)
    with pytest.raises(HeteroError, match="nothing was recorded"):
        rec.trace()
    rec(3, torch.zeros(2, 5), torch.tensor([[0, 1], [1, 2]]), torch.ones(2, 2))
    tr = rec.trace()
    assert tr.x is None and tr.layers == [3] and tr.num_experts == 4
    assert np.allclose(tr.frequencies(), [[0.5, 1.0, 0.5, 0.0]])
    # without num_experts, the largest id seen + 1
    rec = TraceRecorder()
    rec(0, torch.zeros(1, 5), torch.tensor([[2, 5]]), torch.ones(1, 2))
    assert rec.trace().num_experts == 6


def test_save_load_round_trip(tmp_path):
    tr = _toy()
    path = tr.save(tmp_path / "t.safetensors")
    assert not list(tmp_path.glob(".*tmp"))
    back = RoutingTrace.load(path)
    assert (back.num_experts, back.top_k, back.layers, back.meta) == (4, 2, [0, 2], tr.meta)
    for l in tr.layers:
        assert np.array_equal(back.idx[l], tr.idx[l]) and np.array_equal(back.w[l], tr.w[l])
        assert np.array_equal(back.x[l], tr.x[l])
    # a trace without x round-trips without x
    assert RoutingTrace.load(_toy(x=False).save(tmp_path / "nx.safetensors")).x is None
    # the file is plain safetensors with JSON metadata
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert json.loads(f.metadata()["hetero"])["layers"] == [0, 2]
        assert sorted(f.keys()) == ["idx.0", "idx.2", "w.0", "w.2", "x.0", "x.2"]


def test_slice_and_bad_input(tmp_path):
    tr = _toy(N=6)
    part = tr.slice(2, 5)
    assert part.num_tokens == 3 and np.array_equal(part.idx[2], tr.idx[2][2:5]) and part.x[0].shape == (3, 5)
    with pytest.raises(HeteroError, match="no such"):
        RoutingTrace.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(HeteroError, match="unreadable"):
        RoutingTrace.load(tmp_path / "junk.safetensors")
    with pytest.raises(HeteroError, match="outside"):
        RoutingTrace(3, 1, {0: np.array([[3]])}, {0: np.ones((1, 1), np.float32)})
    with pytest.raises(HeteroError, match="different numbers"):
        RoutingTrace(3, 1, {0: np.zeros((2, 1)), 1: np.zeros((3, 1))}, {0: np.ones((2, 1)), 1: np.ones((3, 1))})


def test_a_trace_next_to_the_model_places_frequent_experts_in_ram(tmp_path):
    from hetero.experts.recording import TRACE_FILE, record_ids
    from hetero.placement.greedy import minimum_bytes

    model_dir, _ = tiny_checkpoint(tmp_path, "mixtral", num_local_experts=8, num_hidden_layers=2)
    m = hetero.load_offloaded(model_dir, dtype="float32", planner="greedy", ram="1GB")
    ids = torch.randint(0, m.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    tr = record_ids(m, ids)
    freq = tr.frequencies()  # [2 layers, 8 experts]
    tr.save(model_dir / TRACE_FILE)
    # a budget that keeps some experts on disk: the cost planner puts the frequent ones in RAM
    expert = next(g.nbytes for g in m.groups if g.kind == "expert")
    others = sum(g.nbytes for g in m.groups if g.kind != "expert")
    floor = minimum_bytes(m.groups, m.config, torch.float32, "cpu", 256, 1)["cpu"]
    ram = floor + others + 6 * expert  # 6 of the 16 experts fit in RAM
    with_trace = hetero.load_offloaded(model_dir, dtype="float32", ram=ram, context=256, profile=synthetic_profile(),
                                       expert_cache=0)
    tiers = {(g.layer, g.expert): with_trace.plan.tiers[g.name] for g in with_trace.groups if g.kind == "expert"}
    in_ram = [freq[l][e] for (l, e), t in tiers.items() if t == "cpu"]
    on_disk = [freq[l][e] for (l, e), t in tiers.items() if t == "disk"]
    assert in_ram and on_disk and min(in_ram) >= max(on_disk)
    assert with_trace.executor.experts.caches == {} and not with_trace.notes
    # a trace recorded on other router weights is not used, and the load says so
    other, _ = tiny_checkpoint(tmp_path / "other", "mixtral", seed=1, num_local_experts=8, num_hidden_layers=2)
    (other / TRACE_FILE).write_bytes((model_dir / TRACE_FILE).read_bytes())
    m2 = hetero.load_offloaded(other, dtype="float32", ram=ram, context=256, profile=synthetic_profile(), expert_cache=0)
    assert any("recorded on another model" in n for n in m2.notes)
