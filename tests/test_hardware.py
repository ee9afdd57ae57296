"""The hardware profile: measured (quickly here), cached per hardware fingerprint, JSON round trip."""

import json

import pytest
import torch

from hetero.cli import main
from hetero.placement import hardware, overheads, probes

from plan_helpers import synthetic_profile


def test_json_round_trip(tmp_path):
    p = synthetic_profile(gpu=True)
    assert hardware.Profile.from_json(p.to_json()) == p
    p.save(tmp_path / "p.json")
    assert hardware.Profile.load(tmp_path / "p.json").to_json() == p.to_json()
    with pytest.raises(Exception, match="not a hetero hardware profile"):
        hardware.Profile.from_json('{"ram": 1}')


def test_quick_measurement_is_cached_until_the_hardware_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_HOME", str(tmp_path))
    p = hardware.get_profile(quick=True)
    assert p.quick and p.ram_bytes > 0 and p.disk_free_bytes > 0
    tables = [p.disk_read["buffered"], p.host_clone]
    if p.disk_read["direct"] is not None:  # the reader pool reads with O_DIRECT too (not on tmpfs)
        tables += [p.disk_read["direct"], p.disk_read["pool"]]
    for table in tables:
        assert [b for b, _ in table] == list(probes.BLOCKS) and all(bps > 0 for _, bps in table)
    cpu = p.compute["cpu"]
    assert set(cpu["matvec"]) == {"float32", "bfloat16", "float16"}
    assert all(bps > 0 for table in cpu["matvec"].values() for _, bps in table)
    assert cpu["op_s"] > 0 and {"attn", "mlp", "step"} <= set(cpu["overheads"]["llama"])
    assert {"moe", "expert"} <= set(cpu["overheads"]["mixtral"])
    assert ("cuda" in p.compute) == torch.cuda.is_available()
    assert hardware.cached() == p and hardware.get_profile(quick=True) == p  # no second measurement
    other = json.loads(p.to_json())
    other["fingerprint"]["cpu"] = "another cpu"
    hardware.cache_path().write_text(json.dumps(other))
    assert hardware.cached() is None  # different hardware: measure again


def test_profile_command_prints_the_cached_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HETERO_HOME", str(tmp_path))
    p = synthetic_profile(fingerprint=hardware.fingerprint())
    p.save(hardware.cache_path())
    main(["profile", "--json"])
    assert hardware.Profile.from_json(capsys.readouterr().out) == p
    main(["profile"])
    out = capsys.readouterr().out
    assert "disk read" in out and "decode matvec" in out


def test_overheads_are_measured_per_family():
    o = overheads.measure("cpu", quick=True, model_types=["llama", "qwen3_moe"])
    assert all(v > 0 for v in o["llama"].values())
    assert o["qwen3_moe"]["expert"] >= 0 and o["qwen3_moe"]["attn"] > 0
