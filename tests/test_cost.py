"""The cost model: pure functions of (model, plan, profile, workload) whose parts add up as the executor runs them."""

import dataclasses

import numpy as np
import pytest

from hetero.placement.cost import Workload, bucket_streams, predict, tables, tier_index
from hetero.placement.plan import Plan

from plan_helpers import synthetic_profile, tiny_desc


def _plan(desc, place, compute="cpu", kv=256):
    """A plan placing each group by place(group) (norms always on the compute tier)."""
    tiers = {g.name: compute if g.kind == "norms" else place(g) for g in desc.groups}
    return Plan(tiers=tiers, compute=compute, budgets={}, kv_tokens=kv)


def test_disk_costs_more_than_ram_and_the_bottleneck_says_why():
    desc = tiny_desc("llama", layers=4, hidden_size=256, intermediate_size=1024)
    p = synthetic_profile()
    ram = predict(desc, _plan(desc, lambda g: "cpu"), p)
    half = predict(desc, _plan(desc, lambda g: "disk" if g.layer is not None and g.layer >= 2 else "cpu"), p)
    disk = predict(desc, _plan(desc, lambda g: "disk"), p)
    assert ram.decode_s_per_token < half.decode_s_per_token < disk.decode_s_per_token
    assert ram.bottleneck == "compute on cpu" and ram.streams["disk"] == 0
    assert disk.bottleneck == "disk read"
    assert [b for _, _, b in half.layers] == ["compute on cpu"] * 2 + ["disk read"] * 2
    # a layer on disk costs its cold reads on top of the compute it has in RAM
    for (_, r, _), (_, d, _) in zip(ram.layers, disk.layers):
        assert d["compute"] == pytest.approx(r["compute"], rel=0.05) and d["disk"] > 0


def test_decode_is_the_sum_of_per_group_costs_and_fixed_overheads():
    desc = tiny_desc("mixtral", layers=2, experts=4)
    p, wl = synthetic_profile(), Workload(prompt_tokens=16, new_tokens=16)
    plan = _plan(desc, lambda g: "disk" if g.kind == "expert" else "cpu")
    t = tables(desc, p, wl, "cpu")
    idx = tier_index(t, plan)
    by_group = t.decode[np.arange(len(idx)), idx].sum() + t.fixed_decode.sum()
    assert predict(desc, plan, p, wl).decode_s_per_token == pytest.approx(by_group)
    assert bucket_streams(t, idx).shape == (desc.args.num_hidden_layers + 2, 3)


def test_experts_count_by_activation_probability():
    desc = tiny_desc("mixtral", layers=1, experts=4)  # top-2 of 4: each expert used by half the tokens
    p = synthetic_profile()
    base = predict(desc, _plan(desc, lambda g: "cpu"), p).decode_s_per_token
    one = predict(desc, _plan(desc, lambda g: "disk" if g.name == "layers.0.experts.0" else "cpu"), p).decode_s_per_token
    dense = predict(desc, _plan(desc, lambda g: "disk" if g.name == "layers.0.mlp" else "cpu"), p)
    e = desc.groups.index(next(g for g in desc.groups if g.name == "layers.0.experts.0"))
    uniform = tables(desc, p, Workload(), "cpu")
    always = tables(desc, p, Workload(expert_freq={0: [1.0, 0.5, 0.5, 0.0]}), "cpu")
    extra = [t.decode[e, 2].sum() - t.decode[e, 1].sum() for t in (uniform, always)]
    assert one - base == pytest.approx(extra[0]) and extra[0] == pytest.approx(0.5 * extra[1])
    # a routing trace: expert 0 picked by 95% of tokens costs more on disk than expert 3 at 5%
    trace = Workload(expert_freq={0: [0.95, 0.5, 0.5, 0.05]})
    hot = predict(desc, _plan(desc, lambda g: "disk" if g.name == "layers.0.experts.0" else "cpu"), p, trace)
    cold = predict(desc, _plan(desc, lambda g: "disk" if g.name == "layers.0.experts.3" else "cpu"), p, trace)
    assert hot.decode_s_per_token > cold.decode_s_per_token
    assert dense.decode_s_per_token > base


def test_kv_cost_grows_with_context_and_prefill_with_prompt():
    desc = tiny_desc("llama", layers=2)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "cpu", kv=4096)
    short, long = (predict(desc, plan, p, Workload(prompt_tokens=n, new_tokens=8)) for n in (16, 4000))
    assert long.decode_s_per_token > short.decode_s_per_token
    assert long.prefill_s > short.prefill_s


def test_overlap_costs_each_layer_its_slowest_stream():
    desc = tiny_desc("llama", layers=3, hidden_size=256, intermediate_size=1024)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "disk" if g.kind in ("attn", "mlp") else "cpu")
    serial = predict(desc, plan, p, Workload())
    overlapped = predict(desc, plan, p, Workload(overlap=True))
    assert overlapped.decode_s_per_token < serial.decode_s_per_token
    t = tables(desc, p, Workload(overlap=True), "cpu")
    streams = bucket_streams(t, tier_index(t, plan))
    assert overlapped.decode_s_per_token == pytest.approx(streams.max(axis=1).sum())


def test_gpu_compute_pays_host_to_device_copies_for_ram_groups():
    desc = tiny_desc("llama", layers=2, hidden_size=256, intermediate_size=1024)
    p = synthetic_profile(gpu=True)
    on_gpu = predict(desc, _plan(desc, lambda g: "gpu", "gpu"), p)
    in_ram = predict(desc, _plan(desc, lambda g: "cpu", "gpu"), p)
    on_disk = predict(desc, _plan(desc, lambda g: "disk", "gpu"), p)
    assert on_gpu.streams["copy"] == 0 and in_ram.streams["copy"] > 0 and in_ram.streams["disk"] == 0
    assert on_gpu.decode_s_per_token < in_ram.decode_s_per_token < on_disk.decode_s_per_token
    assert in_ram.bottleneck == "host->gpu copy" and on_gpu.bottleneck == "compute on gpu"
    fake = predict(desc, _plan(desc, lambda g: "cpu", "gpu"), p, Workload(gpu="fake-gpu"))
    assert fake.bottleneck != "compute on gpu"  # the fake gpu computes with the cpu's figures


def test_an_untied_embedding_is_nearly_free_on_disk_and_a_tied_one_is_not():
    p = synthetic_profile()
    for tied, cheap in ((False, True), (True, False)):
        desc = tiny_desc("llama", layers=2, vocab_size=8000, tie_word_embeddings=tied)
        t = tables(desc, p, Workload(), "cpu")
        e = t.names.index("embed")
        extra = t.decode[e, 2].sum() - t.decode[e, 1].sum()
        table = desc.args.vocab_size * desc.args.hidden_size * 4 / 2e9  # reading the whole table at 2 GB/s
        assert (extra < 0.05 * table) == cheap


def test_the_cost_model_is_pure():
    desc = tiny_desc("mixtral", layers=2, experts=4)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "disk" if g.kind == "expert" else "cpu")
    a, b = predict(desc, plan, p), predict(desc, plan, p)
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
