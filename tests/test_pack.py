"""The packed format: layout, exactness, quantization, atomic writes, and damage detection."""

import json
import os

import pytest
import torch

import hetero
from hetero.api import checkpoint_tensors
from hetero.checkpoint.catalogue import Catalogue
from hetero.cli import main
from hetero.errors import HeteroError
from hetero.flash import pack as packs
from hetero.flash import quant
from hetero.flash.reader import aligned_empty

from helpers import model_groups, over_budget, spread_plan, tiny_checkpoint


def _pack(ckpt, fmt="float32", dest=None):
    args, groups = model_groups(ckpt)
    cat = Catalogue(ckpt)
    dest = dest or ckpt / f"hetero-pack.{fmt}"
    packs.write_pack(cat, checkpoint_tensors(args, cat), groups, dest, packs.PackFormat.parse(fmt))
    return packs.Pack(dest), cat, groups


def _extent(p: packs.Pack, group: str) -> torch.Tensor:
    x = p.extents[group]
    buf = aligned_empty(x["nbytes"])
    with open(p.file, "rb") as f:
        f.seek(x["offset"])
        f.readinto(memoryview(buf.numpy()))
    return buf


def test_extents_are_aligned_groups_and_float32_is_exact(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "qwen3_moe")
    p, cat, groups = _pack(ckpt)
    assert [g.name for g in groups] == list(p.extents)  # one extent per plan group, in execution order
    for g in groups:
        x = p.extents[g.name]
        assert x["offset"] % 4096 == 0 and x["nbytes"] % 4096 == 0
        assert sorted(x["tensors"]) == sorted(g.tensors)
        assert len(x["crc32"]) == -(-x["nbytes"] // packs.CHECK_BLOCK)
        for name, t in p.decode(g.name, _extent(p, g.name), torch.float32).items():
            assert torch.equal(t, cat.read(name)), name
    expert = p.extents["layers.1.experts.3"]["tensors"]
    assert {n.rsplit(".", 2)[-2] for n in expert} == {"gate_proj", "up_proj", "down_proj"}  # one extent
    assert p.file.stat().st_size == sum(x["nbytes"] for x in p.extents.values())


def test_packed_bf16_gives_outputs_identical_to_unpacked(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    resident = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("cpu",), dtype=torch.bfloat16))
    packed = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("disk",), dtype=torch.bfloat16))
    assert packed.executor.store.pack.format.dtype == "bfloat16"
    assert torch.equal(packed(ids).logits, resident(ids).logits)
    a = packed.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, resident.generate(ids, max_new_tokens=8, do_sample=False))


def _bf16_checkpoint(tmp_path, family="qwen3_moe", **overrides):
    ckpt, ref = tiny_checkpoint(tmp_path, family, **overrides)
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    return ckpt


def test_a_bf16z_pack_decodes_bit_for_bit_in_three_quarters_of_the_bytes(tmp_path):
    ckpt = _bf16_checkpoint(tmp_path, hidden_size=256, intermediate_size=512, moe_intermediate_size=128)
    z, cat, groups = _pack(ckpt, "bf16z")
    plain, _, _ = _pack(ckpt, "bf16")
    assert z.format.tag == "bf16z" and z.format.codec == "exp4"
    for g in groups:
        x = z.extents[g.name]
        for e in x["tensors"].values():  # layers' and experts' matrices coded; embed and lm_head, read by rows, plain
            assert ("codec" in e) == (len(e["shape"]) == 2 and g.kind not in ("embed", "lm_head"))
        for dtype in (torch.bfloat16, torch.float32):
            for name, t in z.decode(g.name, _extent(z, g.name), dtype).items():
                assert torch.equal(t, cat.read(name).to(dtype)), name
        if g.kind in ("attn", "mlp", "expert"):
            assert x["data_bytes"] < 0.77 * plain.extents[g.name]["data_bytes"]
    ext = packs.staging_extents(z.extents, torch.bfloat16)
    assert ext["layers.1.experts.3"][2:] == (False, "exp4") and ext["embed"][2:] == (True, None)
    # planning before the weights are read: sizes from a guessed escape count, close to the exact ones
    guess = packs.layout(checkpoint_tensors(*model_groups(ckpt)[:1], cat), groups, z.format)
    for g in groups:
        assert abs(guess[g.name]["data_bytes"] - z.extents[g.name]["data_bytes"]) <= 0.01 * z.extents[g.name]["data_bytes"] + 64 * len(g.tensors)


def test_a_matrix_the_codec_cannot_shrink_is_stored_plain(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    with torch.no_grad():  # exponents spread over 120 binades: most would escape
        w = ref.model.layers[0].mlp.up_proj.weight
        w.copy_(torch.exp2(torch.randint(-60, 60, w.shape, generator=torch.Generator().manual_seed(0)).float()))
    ref.to(torch.bfloat16).save_pretrained(ckpt)
    z, cat, _ = _pack(ckpt, "bf16z")
    entry = z.extents["layers.0.mlp"]["tensors"]
    assert "codec" not in entry["model.layers.0.mlp.up_proj.weight"] and "codec" in entry["model.layers.0.mlp.down_proj.weight"]
    got = z.decode("layers.0.mlp", _extent(z, "layers.0.mlp"), torch.bfloat16)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], cat.read("model.layers.0.mlp.up_proj.weight"))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32), ("fake-gpu", torch.bfloat16)])
def test_a_bf16z_pack_gives_outputs_identical_to_bf16_weights(tmp_path, device, dtype):
    ckpt = _bf16_checkpoint(tmp_path)
    compute = "gpu" if device == "fake-gpu" else "cpu"
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    resident = hetero.load_offloaded(ckpt, device=device, dtype=dtype,
                                     plan=spread_plan(ckpt, (compute,), compute, dtype=dtype))
    z = hetero.load_offloaded(ckpt, device=device, dtype=dtype, pack="bf16z",
                              plan=spread_plan(ckpt, ("disk", "cpu"), compute, dtype=dtype, pack="bf16z"))
    assert z.executor.store.pack.format.tag == "bf16z" and z.stats()["io"]["pack_dtype"] == "bf16z"
    assert torch.equal(z(ids).logits, resident(ids).logits)
    assert torch.equal(z.generate(ids, max_new_tokens=6, do_sample=False),
                       resident.generate(ids, max_new_tokens=6, do_sample=False))
    assert z.stats()["decode_disk_read_bytes_per_token"] > 0 and not over_budget(z)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantization_kernels_match_the_torch_reference(bits, dtype):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(bits))
    q, s = quant.quantize(w, bits, 64)
    assert torch.equal(s, s.half().float())  # scales are float16 values, as stored
    want = quant.dequantize_torch(q, s, bits, 64, dtype)
    assert torch.equal(quant.dequantize(q, s, bits, 64, dtype), want)
    err = (quant.dequantize_torch(q, s, bits, 64, torch.float32) - w).abs().reshape(96, 4, 64).amax(-1)
    assert (err <= s * 0.5001).all()  # at most half a quantization step


def test_int8_and_int4_packs_run_close_to_float_and_read_less(tmp_path):
    ckpt, ref = tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = torch.log_softmax(ref(ids).logits, -1)
    read = {}
    for fmt, tag, tol in (("float32", "float32", 1e-4), ("int8", "int8-g64", 0.02), ("int4-g32", "int4-g32", 0.5)):
        m = hetero.load_offloaded(ckpt, plan=spread_plan(ckpt, ("disk",)), pack=fmt)
        assert m.executor.store.pack.format.tag == tag
        got = torch.log_softmax(m(ids).logits, -1)
        kl = (want.exp() * (want - got)).sum(-1).mean().item()
        assert kl <= tol, (fmt, kl)
        m.generate(ids, max_new_tokens=3, do_sample=False)
        read[fmt] = m.stats()["decode_disk_read_bytes_per_token"]
    assert read["int8"] < 0.5 * read["float32"] and read["int4-g32"] < read["int8"]


def test_an_interrupted_pack_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = packs._write_tensor
    monkeypatch.setattr(packs, "_write_tensor", boom)
    with pytest.raises(KeyboardInterrupt):
        _pack(ckpt)
    assert not list(ckpt.glob("*hetero-pack*"))
    # a pack killed outright leaves its temporary directory: it is not taken for a pack, and the next one clears it
    stale = ckpt / ".hetero-pack.float32.tmp-dead"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"\0" * 4096)
    assert packs.open_pack(ckpt / "hetero-pack.float32") is None
    monkeypatch.setattr(packs, "_write_tensor", real)
    p, _, _ = _pack(ckpt)
    assert not stale.exists() and p.path.is_dir()


def test_a_pack_interrupted_in_its_statistics_pass_leaves_nothing(tmp_path, monkeypatch):
    ckpt = _bf16_checkpoint(tmp_path, "llama")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(packs.lossless, "exponent_histogram", boom)
    with pytest.raises(KeyboardInterrupt):
        _pack(ckpt, "bf16z")
    assert not list(ckpt.glob("*hetero-pack*")) and not list(ckpt.glob(".*hetero-pack*"))


def _disk_model(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    plan = spread_plan(ckpt, ("disk",))
    hetero.load_offloaded(ckpt, plan=plan)  # packs it
    return ckpt, plan, ckpt / "hetero-pack.float32"


def test_a_corrupted_pack_names_the_file_and_extent(tmp_path):
    ckpt, plan, path = _disk_model(tmp_path)
    x = json.loads((path / "manifest.json").read_text())["extents"]["layers.1.mlp"]
    with open(path / "weights.bin", "r+b") as f:
        f.seek(x["offset"] + 100)
        b = f.read(1)
        f.seek(x["offset"] + 100)
        f.write(bytes([b[0] ^ 0x40]))
    m = hetero.load_offloaded(ckpt, plan=plan)
    with pytest.raises(HeteroError, match=r"weights\.bin: extent 'layers\.1\.mlp' fails its checksum"):
        m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    assert m.accountant.snapshot()["cpu"].get("staging_bytes", 0) == 0  # nothing leaked


def test_a_truncated_pack_names_the_file_and_extent(tmp_path):
    ckpt, plan, path = _disk_model(tmp_path)
    m = hetero.load_offloaded(ckpt, plan=plan)
    x = json.loads((path / "manifest.json").read_text())["extents"]["layers.2.attn"]
    os.truncate(path / "weights.bin", x["offset"] + 4096)
    with pytest.raises(HeteroError, match=r"weights\.bin: extent 'layers\.2\.attn' ends at byte"):
        m(torch.tensor([[1, 2, 3]]))  # truncated under a running model: the short read is caught
    with pytest.raises(HeteroError, match=r"weights\.bin: truncated .* extent 'layers\.2\.attn'"):
        hetero.load_offloaded(ckpt, plan=plan, pack=str(path))
    with pytest.raises(HeteroError, match="truncated"):  # nor is the automatic pack used silently
        hetero.load_offloaded(ckpt, plan=plan)


def test_cli_pack(tmp_path, capsys):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    main(["pack", str(ckpt), "--quiet"])
    assert (ckpt / "hetero-pack.float32" / "manifest.json").is_file()  # the checkpoint's own dtype
    main(["pack", str(ckpt), "--dtype", "bf16z", "--quiet"])
    assert packs.Pack(ckpt / "hetero-pack.bf16z").format.codec == "exp4"
    main(["pack", str(ckpt), "--dtype", "int8", "--group-size", "32", "--quiet"])
    p = packs.Pack(ckpt / "hetero-pack.int8-g32")
    assert p.format == packs.PackFormat("int8", 32)
    with pytest.raises(SystemExit) as e:
        main(["pack", str(ckpt), "--dtype", "int8", "--group-size", "3"])
    assert e.value.code == 2
