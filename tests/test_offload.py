"""--disk-dir: disk-tier groups copied once (in the compute dtype) to a chosen directory and read from there."""

import pytest
import torch

import hetero
from hetero.errors import HeteroError

from helpers import spread_plan, tiny_checkpoint


def test_disk_dir_copy_is_used_and_reused(tmp_path):
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
    copies = list(disk.glob("*/*.safetensors"))
    assert len(copies) == sum(t == "disk" for t in plan.tiers.values())
    assert any("writing" in line for line in logs)
    # the checkpoint's own files are no longer read for disk-tier groups
    m.executor.store.cat.close()
    m.executor.store.cat._fd = None
    assert (m(ids).logits - want).abs().max().item() <= 1e-4
    logs.clear()
    hetero.load_offloaded(ckpt, plan=plan, disk_dir=disk, log_fn=logs.append)
    assert not any("writing" in line for line in logs)  # reused, not rewritten
    assert not list(disk.glob("*/*.tmp"))


def test_disk_dir_converts_a_bf16_checkpoint_once(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    plan = spread_plan(ckpt, ("disk",))
    disk = tmp_path / "offload"
    disk.mkdir()
    m = hetero.load_offloaded(ckpt, plan=plan, disk_dir=disk, dtype="float32")
    plain = hetero.load_offloaded(ckpt, plan=plan, dtype="float32")
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m(ids).logits, plain(ids).logits)
    assert m.executor.store.disk[next(iter(m.executor.store.disk.tensors))].dtype == torch.float32


def test_disk_dir_must_exist(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    with pytest.raises(HeteroError, match="not a directory"):
        hetero.load_offloaded(ckpt, disk_dir=tmp_path / "nope")
