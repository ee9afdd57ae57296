"""The cost model: pure functions of (model, plan, profile, workload) whose parts add up as the executor runs them."""

import dataclasses

import numpy as np
import pytest

from hetero.errors import HeteroError
from hetero.placement.cost import Workload, bucket_streams, contend, predict, tables, tier_index
from hetero.placement.plan import Plan
from hetero.placement.schedule import COLS, COMP, EPRE, FIFO, PRE, SYNC, TIME, replay

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


def test_without_read_ahead_decode_is_the_sum_of_per_group_costs_and_fixed_overheads():
    desc = tiny_desc("mixtral", layers=2, experts=4)
    p, wl = synthetic_profile(), Workload(prompt_tokens=16, new_tokens=16, overlap=False)
    plan = _plan(desc, lambda g: "disk" if g.kind == "expert" or g.layer == 1 else "cpu")
    t = tables(desc, p, wl, "cpu")
    idx = tier_index(t, plan)
    by_group = t.decode[np.arange(len(idx)), idx][:, TIME].sum() + t.fixed_decode[:, TIME].sum()
    serial = predict(desc, plan, p, wl).decode_s_per_token
    assert serial == pytest.approx(by_group)
    assert bucket_streams(t, idx).shape == (desc.args.num_hidden_layers + 2, COLS)
    # the executor's pipeline reads layer 1 while layer 0 computes: never slower than waiting for every read
    assert predict(desc, plan, p, Workload(prompt_tokens=16, new_tokens=16)).decode_s_per_token < serial


def test_experts_count_by_activation_probability():
    desc = tiny_desc("mixtral", layers=1, experts=4)  # top-2 of 4: each expert used by half the tokens
    p = synthetic_profile()
    base = predict(desc, _plan(desc, lambda g: "cpu"), p).decode_s_per_token
    one = predict(desc, _plan(desc, lambda g: "disk" if g.name == "layers.0.experts.0" else "cpu"), p).decode_s_per_token
    dense = predict(desc, _plan(desc, lambda g: "disk" if g.name == "layers.0.mlp" else "cpu"), p)
    e = desc.groups.index(next(g for g in desc.groups if g.name == "layers.0.experts.0"))
    uniform = tables(desc, p, Workload(), "cpu")
    always = tables(desc, p, Workload(expert_freq={0: [1.0, 0.5, 0.5, 0.0]}), "cpu")
    extra = [t.decode[e, 2, TIME].sum() - t.decode[e, 1, TIME].sum() for t in (uniform, always)]
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


def _rows(layers, pre=(), comp=1.0, head_sync=0.0, head_comp=0.0):
    """Cost rows [layers + 2][COLS]: `comp` seconds of compute per layer, reads `pre` {layer: seconds}."""
    rows = np.zeros((layers + 2, COLS))
    rows[1:-1, COMP] = comp
    for layer, s in dict(pre).items():
        rows[layer + 1, PRE] = s
    rows[-1, SYNC], rows[-1, COMP] = head_sync, head_comp
    return rows


def test_the_schedule_hides_reads_behind_compute_and_waits_when_they_are_late():
    # compute-bound: layer 3's read (2 s) is queued while layers 0-2 compute (3 s): no wait
    assert replay(_rows(4, {3: 2.0}), 1, None, False) == pytest.approx(4.0)
    # read-bound: every layer reads 3 s and computes 1 s; the first read was queued during the
    # previous token's lm_head (1 s), so the loop waits 2 s, then 3 s for each later read, then computes
    stalls = [0.0] * 3
    t = replay(_rows(3, {0: 3.0, 1: 3.0, 2: 3.0}, head_comp=1.0), 1, None, False, stalls=stalls)
    assert t == pytest.approx(2 + 1 + 2 + 1 + 2 + 1 + 1) and stalls == pytest.approx([2.0, 2.0, 2.0])
    assert t == pytest.approx(sum([3.0] * 3) + 1.0 + 1.0 - 1.0)  # disk busy all token but the last compute and lm_head
    # a cold forward (prefill) has nothing queued ahead
    assert replay(_rows(3, {0: 3.0, 1: 3.0, 2: 3.0}, head_comp=1.0), 1, None, False, steady=False) == pytest.approx(11.0)
    # deeper read-ahead: a slow read early is absorbed by compute after it is queued
    slow = _rows(6, {2: 4.0, 5: 1.0})
    assert replay(slow, 2, None, False) <= replay(slow, 1, None, False)
    # lm_head read on the compute thread shares the disk with the next token's queued reads
    alone = replay(_rows(2, head_sync=2.0), 1, None, False)
    shared = replay(_rows(2, {0: 1.0}, head_sync=2.0), 1, None, False)
    assert alone == pytest.approx(4.0) and shared == pytest.approx(5.0)


def test_overlapped_reads_and_compute_stretch_each_other_by_the_measured_contention():
    # compute-bound: 4 s of compute, 2 s of reads; reads 1.5x slower and compute 1.25x slower together.
    # The reads take 3 s, all within the compute, which does 3 / 1.25 = 2.4 s of its work meanwhile: 3 + 1.6
    rows = _rows(4, {3: 2.0})
    out = contend(rows, True, 1.5, 1.25)
    assert out[:, PRE].sum() == pytest.approx(3.0) and out[:, COMP].sum() == pytest.approx(4.6)
    assert out[4, PRE] == pytest.approx(3.0) and out[1, COMP] == pytest.approx(1.15)  # each column keeps its shares
    # read-bound: 3 s of compute, 9 s of reads: compute takes 3.75 s, the reads do 2.5 s of theirs meanwhile,
    # the other 6.5 s alone
    out = contend(_rows(3, {0: 3.0, 1: 3.0, 2: 3.0}), True, 1.5, 1.25)
    assert out[:, COMP].sum() == pytest.approx(3.75) and out[:, PRE].sum() == pytest.approx(3.75 + 6.5)
    # nothing to stretch: no overlap (a serial loop), no reads, or no contention measured
    for args in ((rows, False, 1.5, 1.25), (_rows(3), True, 1.5, 1.25), (rows, True, 1.0, 1.0)):
        assert np.array_equal(contend(*args), args[0])
    # lm_head's reads on the compute thread never overlap its compute
    assert contend(_rows(2, {0: 1.0}, head_sync=2.0), True, 1.5, 1.25)[-1, SYNC] == 2.0


def test_the_profiles_contention_slows_a_plan_that_reads_while_it_computes():
    desc = tiny_desc("llama", layers=4, hidden_size=256, intermediate_size=1024)
    half = _plan(desc, lambda g: "disk" if g.layer is not None and g.layer >= 2 else "cpu")
    p = synthetic_profile()
    cpu = dict(p.compute["cpu"], contention={"float32": {"disk": 1.4, "compute": 1.1}})
    slow = dataclasses.replace(p, compute={**p.compute, "cpu": cpu})
    assert predict(desc, half, slow).decode_s_per_token > predict(desc, half, p).decode_s_per_token
    ram = _plan(desc, lambda g: "cpu")  # nothing read: nothing to contend with
    assert predict(desc, ram, slow).decode_s_per_token == predict(desc, ram, p).decode_s_per_token
    serial = Workload(overlap=False)  # a loop that waits for every read overlaps nothing
    assert predict(desc, half, slow, serial).decode_s_per_token == predict(desc, half, p, serial).decode_s_per_token


def test_predicted_expert_reads_are_queued_by_the_layer_that_predicts_them():
    rows = _rows(6)
    rows[5, EPRE] = 2.0  # layer 4's predicted experts: 2 s of reads
    # predicted by layer 3 (the default, one ahead): queued at its start (3 s), landed at 5 s, and
    # layer 4, ready to start at 4 s, waits 1 s for them
    stalls = [0.0] * 6
    assert replay(rows, 1, None, False, stalls=stalls) == pytest.approx(7.0) and stalls[4] == pytest.approx(1.0)
    # predicted by layer 1 (three ahead): queued at 1 s, landed at 3 s, nothing to wait for
    assert replay(rows, 1, None, False, issuers=[-1, -1, -1, -1, 1, -1]) == pytest.approx(6.0)
    # predicted by none: read when the layer starts, and waited for whole
    assert replay(rows, 1, None, False, issuers=[-1] * 6) == pytest.approx(8.0)
    # they queue behind the pipeline's reads: layer 5's own 4 s read, queued before layer 0 with
    # depth 4, delays layer 4's expert reads queued at 3 s until 6 s
    rows[6, PRE] = 4.0
    stalls = [0.0] * 6
    replay(rows, 4, 0, False, stalls=stalls, steady=False)
    assert stalls[4] == pytest.approx(2.0)


def test_the_first_moe_layer_is_predicted_by_none_and_its_experts_are_fetched_on_demand():
    from hetero.placement.cost import expert_schedule

    desc = tiny_desc("mixtral", layers=3, experts=4, hidden_size=256, intermediate_size=512)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "disk" if g.kind == "expert" else "cpu")
    t = tables(desc, p, Workload(expert_recall=0.9), "cpu")
    rows = bucket_streams(t, tier_index(t, plan))
    assert rows[1, EPRE] == 0 and rows[1, FIFO] > 0  # layer 0: nothing predicted it
    # a read ahead per use (0.9 of them used, 0.1 / 0.9 per use wasted on a wrong guess), 0.1 on demand
    assert rows[2, EPRE] == pytest.approx(10 * rows[2, FIFO]) and rows[3, EPRE] > 0
    ahead, issuers = expert_schedule(t, rows)
    assert issuers == [-1] + [max(0, m - ahead) for m in (1, 2)]
    assert predict(desc, plan, p, Workload(expert_recall=0.9)).expert_lookahead == ahead
    # per expert (layer -> [E]): expert 0 of layer 1 always read ahead, the others never
    t = tables(desc, p, Workload(expert_recall={1: [1.0, 0.0, 0.0, 0.0], 2: [0.0] * 4}), "cpu")
    by = {n: i for i, n in enumerate(t.names)}
    e0, e1 = t.decode[by["layers.1.experts.0"], 2], t.decode[by["layers.1.experts.1"], 2]
    assert e0[FIFO] == 0 and e0[EPRE] > 0 and e1[EPRE] == 0 and e1[FIFO] == pytest.approx(e0[EPRE])


def test_prediction_replays_the_pipeline_between_serial_and_fully_overlapped():
    desc = tiny_desc("llama", layers=3, hidden_size=256, intermediate_size=1024)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "disk" if g.kind in ("attn", "mlp") and g.layer > 0 else "cpu")
    serial = predict(desc, plan, p, Workload(overlap=False))
    piped = predict(desc, plan, p, Workload())
    t = tables(desc, p, Workload(), "cpu")
    rows = bucket_streams(t, tier_index(t, plan))
    assert rows[:, PRE].sum() + rows[:, COMP].sum() == pytest.approx(serial.decode_s_per_token)
    assert max(rows[:, PRE].sum(), rows[:, COMP].sum()) <= piped.decode_s_per_token < serial.decode_s_per_token
    assert piped.stall_s == pytest.approx(sum(s["stall"] for _, s, _ in piped.layers))


def test_read_sizes_follow_the_pack_layout():
    desc = tiny_desc("llama", layers=2, hidden_size=256, intermediate_size=1024)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "disk" if g.kind in ("attn", "mlp") else "cpu")
    f32 = predict(desc, plan, p, Workload(overlap=False))
    # an int8 pack: a quarter of the bytes read, decoded into float32 buffers on the compute thread
    ext = {g.name: (-(-g.nbytes // 4 // 4096) * 4096, g.nbytes // 4, False, "int8") for g in desc.groups}
    i8 = predict(desc, plan, p, Workload(overlap=False, extents=ext))
    assert i8.streams["disk"] < 0.5 * f32.streams["disk"] and i8.streams["compute"] > f32.streams["compute"]


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
        desc = tiny_desc("llama", layers=2, vocab_size=32000, hidden_size=256, tie_word_embeddings=tied)
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


def test_expert_frequencies_from_a_trace_array_replace_the_uniform_prior():
    desc = tiny_desc("mixtral", layers=2, experts=4)
    p = synthetic_profile()
    freq = np.array([[0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]])  # [n_moe_layers, E], rows sum to top_k
    t = tables(desc, p, Workload(expert_freq=freq), "cpu")
    cost = {n: t.decode[i, 2, TIME].sum() - t.decode[i, 1, TIME].sum() for i, n in enumerate(t.names)}
    assert cost["layers.0.experts.0"] == pytest.approx(9 * cost["layers.0.experts.2"])
    assert cost["layers.1.experts.0"] == pytest.approx(cost["layers.1.experts.3"])
    with pytest.raises(HeteroError, match="do not fit"):
        tables(desc, p, Workload(expert_freq=np.ones((3, 4))), "cpu")


def test_an_expert_cache_serves_the_hottest_disk_experts():
    desc = tiny_desc("mixtral", layers=1, experts=4)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "disk" if g.kind == "expert" else "cpu")
    freq = Workload(expert_freq={0: [0.9, 0.6, 0.4, 0.1]})
    none, two, all4 = (predict(desc, dataclasses.replace(plan, expert_cache={"cpu": n}), p, freq).decode_s_per_token
                       for n in (0, 2, 4))
    ram = predict(desc, _plan(desc, lambda g: "cpu"), p, freq).decode_s_per_token
    assert ram == pytest.approx(all4) and all4 < two < none
    # two slots hold experts 0 and 1: as if they lived in RAM and 2, 3 on disk
    hot = predict(desc, _plan(desc, lambda g: "disk" if g.kind == "expert" and g.expert >= 2 else "cpu"), p, freq)
    assert two == pytest.approx(hot.decode_s_per_token)


def test_an_expert_cache_adds_the_managers_measured_work_to_each_moe_layer():
    desc = tiny_desc("mixtral", layers=2, experts=4)
    p = synthetic_profile()
    cpu = p.compute["cpu"]
    managed = dataclasses.replace(p, compute={**p.compute, "cpu": {
        **cpu, "overheads": {**cpu["overheads"], "mixtral": {**cpu["overheads"]["mixtral"], "cached_moe": 1e-3}}}})
    plan = dataclasses.replace(_plan(desc, lambda g: "disk" if g.kind == "expert" else "cpu"), expert_cache={"cpu": 8})
    base, more = (predict(desc, plan, q).decode_s_per_token for q in (p, managed))
    assert more == pytest.approx(base + 2 * 1e-3)  # every expert cached: compute only, one figure per MoE layer
    no_cache = dataclasses.replace(plan, expert_cache={})
    assert predict(desc, no_cache, managed).decode_s_per_token == pytest.approx(predict(desc, no_cache, p).decode_s_per_token)


def test_with_a_trace_the_cache_is_replayed_and_locality_counts():
    from hetero.experts.trace import RoutingTrace

    desc = tiny_desc("mixtral", layers=1, experts=4)
    p = synthetic_profile()
    plan = dataclasses.replace(_plan(desc, lambda g: "disk" if g.kind == "expert" else "cpu"), expert_cache={"cpu": 2})
    ram = predict(desc, _plan(desc, lambda g: "cpu"), p).decode_s_per_token
    disk = predict(desc, dataclasses.replace(plan, expert_cache={}), p).decode_s_per_token

    def trace(rows):
        idx = np.asarray(rows)  # [N, k]
        return RoutingTrace(4, 2, {0: idx}, {0: np.full(idx.shape, 0.5, np.float32)})
    # every token picks experts 0 and 1 at equal frequencies as in `spread`: with the locality the
    # two slots serve every use (as if all lived in RAM); spread over all four, a 2-slot cache misses
    local = trace([[0, 1]] * 200 + [[2, 3]] * 200)
    spread = trace([[t % 4, (t + 1) % 4] for t in range(400)])
    freq = local.frequencies()
    hot = predict(desc, plan, p, Workload(expert_freq=freq, routing_trace=local, expert_policy="lru")).decode_s_per_token
    cold = predict(desc, plan, p, Workload(expert_freq=freq, routing_trace=spread, expert_policy="lru")).decode_s_per_token
    assert hot == pytest.approx(ram, rel=0.02)
    assert ram < cold <= disk
    # the frequencies alone (no trace) give the static picture: the two most used of four cached
    static = predict(desc, plan, p, Workload(expert_freq=freq)).decode_s_per_token
    assert ram < static < disk


def test_experts_the_predictor_reads_ahead_overlap_compute():
    desc = tiny_desc("mixtral", layers=3, experts=4, hidden_size=256, intermediate_size=512)
    p = synthetic_profile()
    plan = _plan(desc, lambda g: "disk" if g.kind == "expert" else "cpu")
    demand, ahead = (predict(desc, plan, p, Workload(expert_recall=r)) for r in (0.0, 0.9))
    assert ahead.decode_s_per_token < demand.decode_s_per_token
    # the same reads hidden better, plus the wrong guesses': 0.1 / 0.9 of a read per expert read ahead, and
    # layer 0's experts are predicted by no layer (a third of the expert reads here)
    assert ahead.streams["disk"] == pytest.approx(demand.streams["disk"] * (1 + 2 / 3 * 0.1))


def test_each_matvec_call_pays_its_fixed_cost_and_the_table_size_keeps_its_rate():
    from hetero.placement.cost import Speeds

    p = synthetic_profile()
    cpu = dict(p.compute["cpu"], matvec_call_s={"float32": 40e-6}, matvec_bytes=4 * 2**20)
    sp = Speeds(dataclasses.replace(p, compute={**p.compute, "cpu": cpu}), "cpu", Workload())
    rate = 12e9  # synthetic_profile's float32 rate at 4096 columns
    assert sp.mv(4 * 2**20, 4096, "float32") == pytest.approx(4 * 2**20 / rate)  # as measured
    small = sp.mv(2**18, 4096, "float32")
    assert small > 2**18 / rate and small == pytest.approx(2**18 * (1 / rate - 40e-6 / 2**22) + 40e-6)
    assert sp.mv(2**18, 4096, "float32", calls=3) == pytest.approx(small + 80e-6)
    assert sp.mv(2**18, 4096, "float32", calls=0) == pytest.approx(small - 40e-6)
    # a profile without the figure: the table's rate alone
    assert Speeds(p, "cpu", Workload()).mv(2**18, 4096, "float32") == pytest.approx(2**18 / rate)
