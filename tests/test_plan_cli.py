"""`hetero plan` on config-only directories of real models: consistent totals, clear errors."""

import json
from dataclasses import replace

import pytest

from hetero.cli import main

from plan_helpers import synthetic_profile

from published_configs import CONFIGS


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    synthetic_profile().save(path)
    return path


def _config_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIGS[name][1]))
    return d


def _plan(capsys, *argv):
    try:
        main(["plan", *map(str, argv)])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_only_plans_are_consistent(tmp_path, capsys, profile_file, name):
    # how fast it answers is measured by benchmarks/plan_speed.py (no timing thresholds in tests)
    d = _config_dir(tmp_path, name)
    code, out, err = _plan(capsys, d, "--ram", "64GB", "--context", "4096", "--json", "--profile", profile_file)
    assert code == 0, err
    r = json.loads(out)
    params, cfg = CONFIGS[name]
    assert r["source"] == "config" and r["parameters"] == pytest.approx(params, rel=0.03)
    assert sum(r["weights_bytes"].values()) == r["model_bytes"] == 2 * r["parameters"]  # bfloat16
    assert r["tiers"]["cpu"]["total_bytes"] <= 64e9 and r["kv_tokens"] == 4096
    assert len(r["layers"]) == cfg["num_hidden_layers"]
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        n = cfg.get("num_local_experts") or cfg["num_experts"]
        assert all(sum(row["experts"].values()) == n for row in r["layers"])
    p = r["predicted"]
    assert p["decode_tokens_per_s"] > 0 and p["prefill_tokens_per_s"] > 0 and p["bottleneck"]
    assert r["minimum"]["cpu_bytes"] < r["tiers"]["cpu"]["total_bytes"]


def test_table_output_names_tiers_speed_and_minimum(tmp_path, capsys, profile_file):
    d = _config_dir(tmp_path, "Mixtral-8x7B")
    code, out, err = _plan(capsys, d, "--ram", "32GB", "--profile", profile_file, "--save", tmp_path / "plan.json")
    assert code == 0, err
    for words in ("experts:", "tokens/s", "bottleneck", "runs at all with: --ram", "disk:"):
        assert words in out, words
    assert json.loads((tmp_path / "plan.json").read_text())["compute"] == "cpu"


def test_budget_below_the_minimum_names_it(tmp_path, capsys, profile_file):
    d = _config_dir(tmp_path, "Llama-3-70B")
    code, out, err = _plan(capsys, d, "--ram", "100MB", "--profile", profile_file)
    assert code == 2
    assert "minimum working set" in err and "raise --ram to at least" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [(["--ram", "12XB"], "cannot read '12XB' as a size"),
                                          (["--ram", "-5GB"], "cannot read"),
                                          (["--ram", "8GB", "--context", "0"], "supports 1 to"),
                                          (["--ram", "8GB", "--pack", "int3"], "pack dtype 'int3': choose one of")])
def test_nonsense_gets_a_clear_error_and_exit_code_2(tmp_path, capsys, profile_file, argv, message):
    d = _config_dir(tmp_path, "Qwen3-30B-A3B")
    code, out, err = _plan(capsys, d, *argv, "--profile", profile_file)
    assert code == 2 and message in err and err.startswith("error:")


def test_headers_and_config_only_describe_the_same_model(tmp_path):
    from hetero.placement.describe import describe_dir

    from helpers import tiny_checkpoint

    for family in ("mixtral", "qwen3_moe", "qwen2_moe"):
        ckpt, _ = tiny_checkpoint(tmp_path, family)
        bare = tmp_path / f"{family}-config-only"
        bare.mkdir()
        (bare / "config.json").write_text((ckpt / "config.json").read_text())
        a, b = describe_dir(ckpt), describe_dir(bare, "float32")
        assert [(g.name, g.nbytes) for g in a.groups] == [(g.name, g.nbytes) for g in b.groups]
        assert a.source == "checkpoint" and b.source == "config"


def _trace_file(path, layers, E, k, local: bool):
    """A routing trace: each token picks k experts per layer; `local`: the same ones for 40 tokens in a row."""
    import numpy as np

    from hetero.experts.trace import RoutingTrace

    N = 400
    rows = [[(t // 40 * k + j) % E if local else (t * 3 + j * 5) % E for j in range(k)] for t in range(N)]
    idx = {l: np.array(rows, dtype=np.int64) for l in layers}
    w = {l: np.full((N, k), 1 / k, np.float32) for l in layers}
    RoutingTrace(E, k, idx, w).save(path)
    return path


def test_a_routing_trace_places_experts_and_predicts_the_caches(tmp_path, capsys, profile_file):
    d = _config_dir(tmp_path, "Mixtral-8x7B")  # 32 MoE layers, 8 experts, top-2
    base = ["--ram", "40GB", "--context", "1024", "--json", "--profile", profile_file]
    code, out, err = _plan(capsys, d, *base)
    assert code == 0, err
    plain = json.loads(out)
    assert any("no routing trace" in n and "hetero trace" in n for n in plain["notes"])  # the uniform prior is said
    runs = {}
    for local in (True, False):
        t = _trace_file(tmp_path / f"trace-{local}.safetensors", range(32), 8, 2, local)
        code, out, err = _plan(capsys, d, *base, "--trace", t)
        assert code == 0, err
        runs[local] = json.loads(out)
        assert any("routing trace" in n for n in runs[local]["notes"])
        assert not any("no routing trace" in n for n in runs[local]["notes"])
    # the caches replayed on a trace whose tokens reuse their experts serve more than on one that never does
    assert runs[True]["predicted"]["decode_s_per_token"] < runs[False]["predicted"]["decode_s_per_token"]
    assert plain["predicted"]["decode_s_per_token"] != runs[True]["predicted"]["decode_s_per_token"]


def test_the_trace_next_to_the_model_is_used_without_being_named(tmp_path, capsys, profile_file):
    d = _config_dir(tmp_path, "Mixtral-8x7B")
    base = ["--ram", "40GB", "--context", "1024", "--json", "--profile", profile_file]
    named = _trace_file(tmp_path / "named.safetensors", range(32), 8, 2, True)
    code, out, err = _plan(capsys, d, *base, "--trace", named)
    assert code == 0, err
    with_flag = json.loads(out)
    _trace_file(d / "routing-trace.safetensors", range(32), 8, 2, True)  # what `hetero trace` leaves there
    code, out, err = _plan(capsys, d, *base)
    assert code == 0, err
    found = json.loads(out)
    assert any("next to the model" in n for n in found["notes"])
    assert found["predicted"] == with_flag["predicted"]
    _trace_file(d / "routing-trace.safetensors", range(32), 4, 2, True)  # a stale one, of another shape: a note
    code, out, err = _plan(capsys, d, *base)
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert any("4 experts" in n and "placed without it" in n and "next to the model" in n for n in notes)
    assert not any("--trace" in n and "4 experts" in n for n in notes)  # the user gave no --trace


def test_a_trace_of_another_model_is_refused_in_one_line(tmp_path, capsys, profile_file):
    d = _config_dir(tmp_path, "Mixtral-8x7B")
    t = _trace_file(tmp_path / "t.safetensors", range(32), 4, 2, True)
    code, out, err = _plan(capsys, d, "--ram", "40GB", "--profile", profile_file, "--trace", t)
    assert code == 2 and "4 experts" in err and "8 experts" in err and len(err.strip().splitlines()) == 1
    dense = _config_dir(tmp_path, "Llama-3-70B")
    code, out, err = _plan(capsys, dense, "--ram", "40GB", "--profile", profile_file, "--trace", t)
    assert code == 2 and "dense model" in err
    code, out, err = _plan(capsys, d, "--ram", "40GB", "--profile", profile_file, "--trace", tmp_path / "missing")
    assert code == 2 and "no such routing trace" in err


def test_a_quantized_pack_is_planned_with_its_layout(tmp_path, capsys):
    # Llama-3-70B in 32 GB of RAM streams most of its weights from a 1 GB/s disk: an int8 pack reads
    # about half the bytes of the bf16 one and int4 about a quarter, and the predicted decode follows
    # the bytes, less the decoding they cost the compute thread (dequant_bps)
    slow = {mode: [[b, b / (b / 1e9 + 50e-6)] for b, _ in rows] for mode, rows in synthetic_profile().disk_read.items()}
    profile_file = tmp_path / "profile.json"
    replace(synthetic_profile(), disk_read=slow).save(profile_file)
    d = _config_dir(tmp_path, "Llama-3-70B")
    plans = {}
    for pack in ("bf16", "int8", "int4"):
        code, out, err = _plan(capsys, d, "--ram", "32GB", "--pack", pack, "--json", "--profile", profile_file)
        assert code == 0, err
        plans[pack] = json.loads(out)
    bf16, int8, int4 = plans["bf16"], plans["int8"], plans["int4"]
    assert (bf16["pack"], int8["pack"], int4["pack"]) == ("bfloat16", "int8-g64", "int4-g64")
    assert bf16["pack_bytes"] >= bf16["model_bytes"]  # lossless: every byte, padded to 4 KiB extents
    assert 0.5 < int8["pack_bytes"] / bf16["pack_bytes"] < 0.55  # 1 byte a weight + a float16 scale per 64
    assert 0.25 < int4["pack_bytes"] / bf16["pack_bytes"] < 0.3
    assert bf16["predicted"]["bottleneck"] == "disk read"
    assert int4["predicted"]["decode_s_per_token"] < int8["predicted"]["decode_s_per_token"] < \
        0.7 * bf16["predicted"]["decode_s_per_token"]
    # the decoding is on the compute stream: 1 byte -> 2 per weight at 8 GB/s for what is read from disk
    compute = {k: p["predicted"]["decode_streams_s"]["compute"] for k, p in plans.items()}
    assert compute["int8"] - compute["bf16"] == pytest.approx(int8["weights_bytes"]["disk"] / 8e9, rel=0.1)
    code, out, err = _plan(capsys, d, "--ram", "32GB", "--pack", "int8", "--profile", profile_file)
    assert code == 0 and "int8-g64 pack of" in out
