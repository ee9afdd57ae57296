"""Disk-tier weights come from the pack (flash/pack.py): made once where --disk-dir says, reused after."""

import pytest
import torch

import hetero
from hetero.errors import HeteroError

from helpers import spread_plan, tiny_checkpoint


def test_disk_dir_pack_is_used_and_reused(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(0, 300, (2, 31), generator=torch.Generator().manual_seed(1))
    plan = spread_plan(ckpt, ("disk", "cpu"))
    disk = tmp_path / "offload"
    disk.mkdir()
    logs = []
    m = hetero.load_offloaded(ckpt, plan=plan, disk_dir=disk, log_fn=logs.append)
    with torch.inference_mode():
        want = ref(ids).logits
    assert (m(ids).logits - want).abs().max().item() <= 1e-4
    packs = list(disk.glob("*.hetero-pack.float32"))
    assert len(packs) == 1 and (packs[0] / "manifest.json").is_file()
    assert any("packing" in line for line in logs)
    # the checkpoint's own files are no longer read for disk-tier groups
    m.executor.store.cat.close()
    m.executor.store.cat._fd = None
    assert (m(ids).logits - want).abs().max().item() <= 1e-4
    logs.clear()
    hetero.load_offloaded(ckpt, plan=plan, disk_dir=disk, log_fn=logs.append)
    assert not any("packing" in line for line in logs)  # reused, not rewritten
    assert not list(disk.glob(".*tmp*"))
    assert not list(ckpt.glob("hetero-pack*"))  # nothing written next to the model


def test_pack_defaults_to_the_model_directory(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    m = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("disk",)))
    assert m.executor.store.pack.path == ckpt / "hetero-pack.float32"
    assert m.stats()["io"]["pack"] == str(ckpt / "hetero-pack.float32")


def test_no_pack_when_nothing_is_on_disk(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    m = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("cpu",)))
    assert m.executor.store.pack is None
    assert not list(ckpt.glob("hetero-pack*"))


def test_bf16_checkpoint_computed_in_float32_packs_in_the_compute_dtype(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    plan = spread_plan(ckpt, ("disk",))
    disk = tmp_path / "offload"
    disk.mkdir()
    m = hetero.load_offloaded(ckpt, plan=plan, disk_dir=disk, dtype="float32")
    resident = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("cpu",)), dtype="float32")
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m(ids).logits, resident(ids).logits)
    assert m.executor.store.pack.format.dtype == "float32"


def test_a_stale_pack_is_rebuilt(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    plan = spread_plan(ckpt, ("disk",))
    hetero.load_offloaded(ckpt, plan=plan)
    with torch.no_grad():
        ref.lm_head.weight.mul_(2)
    ref.save_pretrained(ckpt)  # the checkpoint changed: the old pack must not be used
    logs = []
    m = hetero.load_offloaded(ckpt, plan=plan, log_fn=logs.append)
    assert any("packing" in line for line in logs)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert (m(ids).logits - ref(ids).logits).abs().max().item() <= 1e-4


def test_disk_dir_must_exist(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    with pytest.raises(HeteroError, match="not a directory"):
        hetero.load_offloaded(ckpt, disk_dir=tmp_path / "nope")
