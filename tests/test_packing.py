"""Which pack the disk tier reads when none is named: the lossless format the cost model predicts faster."""

import dataclasses

import pytest
import torch

import hetero
from hetero.flash.pack import PackFormat
from hetero.placement.cost import Workload
from hetero.placement.packing import lossless_formats, pick_format
from hetero.placement.plan import Plan

from helpers import over_budget, spread_plan, tiny_checkpoint
from plan_helpers import BLOCKS, synthetic_profile, tiny_desc


def _on_disk(desc):
    tiers = {g.name: "cpu" if g.kind in ("norms", "embed") else "disk" for g in desc.groups}
    return Plan(tiers=tiers, compute="cpu", budgets={}, kv_tokens=256)


def _profile(disk_bps: float, decode_bps: float):
    p = synthetic_profile()
    table = [[b, disk_bps] for b in BLOCKS]
    cpu = {**p.compute["cpu"], "lossless_bps": {"exp4": {"bfloat16": decode_bps, "float32": decode_bps}}}
    return dataclasses.replace(p, disk_read={"buffered": table, "direct": table, "pool": table}, compute={"cpu": cpu})


def test_a_bfloat16_checkpoint_may_be_read_compressed_and_others_as_they_are():
    assert [f.tag for f in lossless_formats(tiny_desc("llama", dtype=torch.bfloat16))] == ["bfloat16", "bf16z"]
    assert [f.tag for f in lossless_formats(tiny_desc("llama", dtype=torch.float32))] == ["float32"]


@pytest.mark.parametrize("disk_bps,decode_bps,want", [(0.2e9, 16e9, "bf16z"), (100e9, 0.5e9, "bfloat16")])
def test_the_format_predicted_faster_is_chosen(disk_bps, decode_bps, want):
    desc = tiny_desc("llama", layers=4, hidden_size=512, intermediate_size=2048, dtype=torch.bfloat16)
    planned = []

    def plan_for(extents):
        planned.append(extents)
        return _on_disk(desc), None

    fmt, extents, plan, prediction = pick_format(desc, lossless_formats(desc), _profile(disk_bps, decode_bps),
                                                 Workload(), plan_for)
    # the plain plan's placement read from a bf16z pack is predicted first: planned again only if faster
    assert fmt.tag == want and extents is planned[-1 if want == "bf16z" else 0]
    assert len(planned) == (2 if want == "bf16z" else 1)
    layer = extents["layers.0.mlp"]
    assert (layer[3], layer[2]) == (("exp4", False) if want == "bf16z" else (None, True))
    assert prediction.decode_s_per_token > 0


def test_a_plan_without_disk_reads_no_pack_and_keeps_the_plain_format():
    desc = tiny_desc("llama", layers=2, dtype=torch.bfloat16)
    calls = []

    def plan_for(extents):
        calls.append(extents)
        return Plan(tiers={g.name: "cpu" for g in desc.groups}, compute="cpu", budgets={}, kv_tokens=256), None

    fmt, *_ = pick_format(desc, lossless_formats(desc), _profile(0.1e9, 16e9), Workload(), plan_for)
    assert fmt == PackFormat.parse("bf16") and len(calls) == 1


@pytest.mark.parametrize("disk_bps,decode_bps,want", [(0.2e9, 16e9, "bf16z"), (100e9, 0.5e9, "bfloat16")])
def test_loading_packs_the_format_the_cost_model_picks_and_computes_the_same(tmp_path, disk_bps, decode_bps, want):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    resident = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("cpu",), dtype=torch.bfloat16))
    m = hetero.load_offloaded(ckpt, ram="8MB", context=64, profile=_profile(disk_bps, decode_bps))
    assert "disk" in m.plan.tiers.values() and m.executor.store.pack.format.tag == want
    assert torch.equal(m.generate(ids, max_new_tokens=4, do_sample=False),
                       resident.generate(ids, max_new_tokens=4, do_sample=False))
    assert not over_budget(m) and m.stats()["predicted_decode_s_per_token"] > 0


@pytest.mark.parametrize("fmt", ["bf16", "bf16z", "int8", "int4-g32", "float32"])
def test_planned_extents_are_the_layouts_laid_out_once_per_group_shape(fmt):
    from hetero.flash.pack import layout, planned_extents, staging_extents

    desc = tiny_desc("mixtral", layers=3, experts=8, hidden_size=256, intermediate_size=512, dtype=torch.bfloat16)
    f = PackFormat.parse(fmt)
    for dtype in (torch.bfloat16, torch.float32):
        assert planned_extents(desc.tensors, desc.groups, f, dtype) == staging_extents(layout(desc.tensors, desc.groups, f), dtype)


def test_a_pack_already_written_is_the_incumbent(tmp_path):
    from hetero.api import pack_model
    from hetero.placement.describe import describe_dir

    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    desc = describe_dir(ckpt)
    assert [f.tag for f in lossless_formats(desc, ckpt)] == ["bfloat16", "bf16z"]
    pack_model(ckpt, dtype="bf16z", log_fn=lambda *_: None)
    assert [f.tag for f in lossless_formats(desc, ckpt)] == ["bf16z", "bfloat16"]  # kept unless plain is MARGIN faster
