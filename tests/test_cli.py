"""The `hetero` command end to end: pull and run the embedded default model, JSON output, and errors."""

import json
import os
import subprocess
import sys

import pytest

QUESTION = "What is the capital of France?"


def hetero(*args, home=None, check=False, timeout=600):
    env = dict(os.environ)
    if home is not None:
        env["HETERO_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "hetero", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture(scope="session")
def home(tmp_path_factory):
    """A fresh model store into which `hetero pull smollm2` has fetched the default model."""
    home = tmp_path_factory.mktemp("hetero-home")
    hetero("pull", "smollm2", "--quiet", home=home, check=True)
    return home


def test_run_default_model_by_name_well_below_its_size(home):
    proc = hetero("run", "smollm2", "--ram", "200MB", "--prompt", QUESTION, "--max-tokens", "24", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "placement" in proc.stderr and "disk" in proc.stderr  # the plan table, with a disk tier


def test_run_json_reports_the_documented_fields(home):
    proc = hetero("run", "smollm2", "--ram", "200MB", "--prompt", QUESTION, "--max-tokens", "12", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("text", "prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                "decode_s_per_token", "decode_disk_read_bytes_per_token", "resident_bytes", "peak_bytes", "budget_bytes"):
        assert key in out, key
    assert "Paris" in out["text"]
    assert out["peak_bytes"]["cpu"] <= out["budget_bytes"]["cpu"] == 200 * 10**6
    assert out["decode_disk_read_bytes_per_token"] > 100 * 2**20  # most of the 540 MB model streams from disk
    assert out["resident_bytes"]["disk"] > out["resident_bytes"]["cpu"]


def test_stats_flag_and_unused_vram(home):
    proc = hetero("run", "smollm2", "--prompt", "Hi", "--max-tokens", "4", "--stats", "--vram", "8GB", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr and "resident weights" in proc.stderr
    assert "--vram is unused" in proc.stderr


def test_list_and_rm(home, tmp_path):
    proc = hetero("list", "--json", home=home, check=True)
    models = json.loads(proc.stdout)["models"]
    assert [m["name"] for m in models] == ["smollm2"]
    # the runs above put most of the model on disk, which packed it (lossless: the checkpoint's float32)
    assert models[0]["packs"] == ["float32"]
    assert "packs" in hetero("list", home=home, check=True).stdout
    assert hetero("rm", "nothing-here", home=home).returncode == 2


def _one_clean_line(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, smollm2_dir):
    assert "no such file" in _one_clean_line(hetero("run", tmp_path / "missing", "--prompt", "x"))
    assert "cannot read" in _one_clean_line(hetero("run", smollm2_dir, "--ram", "lots", "--prompt", "x"))
    assert "unknown model" in _one_clean_line(hetero("run", "no-such-model", "--prompt", "x", home=tmp_path))
    line = _one_clean_line(hetero("run", smollm2_dir, "--ram", "20MB", "--prompt", "x"))
    assert "minimum working set" in line and "at least" in line
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((smollm2_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert "never unpickles" in _one_clean_line(hetero("run", pickled, "--prompt", "x"))
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text('{"tiers": {}, "compute": "cpu", "budgets": {}, "kv_tokens": 64}')
    assert "no tier for" in _one_clean_line(hetero("run", smollm2_dir, "--plan", bad_plan, "--prompt", "x"))


def _copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.link(f, dst / f.name) if f.suffix != ".json" else (dst / f.name).write_text(f.read_text())
    return dst


def test_corrupt_checkpoints_are_refused(tmp_path, smollm2_dir):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in smollm2_dir.iterdir():
        if f.suffix == ".safetensors":
            with open(f, "rb") as src, open(truncated / f.name, "wb") as dst:
                dst.write(src.read(f.stat().st_size // 2))
        elif f.is_file():
            (truncated / f.name).write_bytes(f.read_bytes())
    assert "truncated" in _one_clean_line(hetero("run", truncated, "--prompt", "x"))
    mismatch = _copy_model(smollm2_dir, tmp_path / "mismatch")
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["intermediate_size"] += 64
    (mismatch / "config.json").write_text(json.dumps(cfg))
    assert "does not match" in _one_clean_line(hetero("run", mismatch, "--prompt", "x"))


def test_import_gguf_into_the_store(tmp_path, smollm2_gguf):
    home = tmp_path / "home"
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    assert "broken.gguf" in _one_clean_line(hetero("import", bad, home=home))
    assert not [p for p in (home / "models").iterdir()]  # nothing half-written left behind
    proc = hetero("import", smollm2_gguf, "--name", "smol-bf16", "--dtype", "bfloat16", "--quiet", home=home)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(hetero("list", "--json", home=home, check=True).stdout)["models"]
    assert [(m["name"], m["dtype"]) for m in listed] == [("smol-bf16", "bfloat16")]
    assert 250e6 < listed[0]["bytes"] < 300e6
    assert hetero("rm", "smol-bf16", home=home).returncode == 0
    assert json.loads(hetero("list", "--json", home=home, check=True).stdout)["models"] == []
