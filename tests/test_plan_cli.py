"""`hetero plan` on config-only directories of real models: fast, consistent totals, clear errors."""

import json
import time

import pytest

from hetero.cli import main

from plan_helpers import synthetic_profile

# the published config.json values (the fields hetero reads)
CONFIGS = {
    "Mixtral-8x7B": (46.7e9, dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16")),
    "Qwen3-30B-A3B": (30.5e9, dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        use_sliding_window=False, torch_dtype="bfloat16")),
    "Llama-3-70B": (70.6e9, dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")),
    "Qwen3-235B-A22B": (235.1e9, dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=1536, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=40960, tie_word_embeddings=False, use_sliding_window=False, torch_dtype="bfloat16")),
}


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
def test_config_only_plans_are_fast_and_consistent(tmp_path, capsys, profile_file, name):
    d = _config_dir(tmp_path, name)
    t0 = time.perf_counter()
    code, out, err = _plan(capsys, d, "--ram", "64GB", "--context", "4096", "--json", "--profile", profile_file)
    elapsed = time.perf_counter() - t0
    assert code == 0, err
    assert elapsed < 2.0, f"{name}: hetero plan took {elapsed:.2f} s"
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
                                          (["--ram", "8GB", "--context", "0"], "supports 1 to")])
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
