"""Parity of every model family with transformers, under every kind of placement.

For each family a tiny random model is built with transformers and saved; hetero loads the saved
checkpoint under four plans (all resident; cpu/disk split; all on disk; gpu/cpu/disk with the fake
gpu) and must give the same prefill logits (|Δ| <= 1e-4) and the same 16 greedy tokens, without
any tier's accountant peak passing its budget.
"""

import pytest
import torch

from hetero.api import load_offloaded
from hetero.errors import HeteroError
from hetero.models import supported_model_types
from hetero.placement import plan
from hetero.runtime import weights

pytest.importorskip("transformers")

from helpers import EOS, FAMILIES, VOCAB, edit_config, over_budget, spread_plan, tiny_checkpoint  # noqa: E402

B, T, NEW = 2, 32, 16
ATOL = 1e-4


def _plan(kind: str, model_dir):
    """load_offloaded's keyword arguments for one of the four placements under test."""
    if kind == "resident":
        return {"device": "cpu"}
    if kind == "cpu_disk":
        return {"device": "cpu", "plan": spread_plan(model_dir, ("disk", "cpu"), norms="cpu")}
    if kind == "disk":
        return {"device": "cpu", "plan": spread_plan(model_dir, ("disk",), norms="cpu")}
    if kind == "three_tiers":
        plan = spread_plan(model_dir, ("cpu", "gpu", "disk"), compute="gpu", norms="gpu")
        return {"device": "fake-gpu", "plan": plan}
    raise ValueError(kind)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: a thread pool only adds spin-waiting, which on a busy 2-core machine costs 10x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reference(request, tmp_path_factory):
    """(checkpoint dir, prompt ids [B, T], transformers' logits [B, T, V], its greedy ids [B, T + NEW])."""
    family = request.param
    model_dir, hf = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), family)
    ids = torch.randint(2, VOCAB - 1, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = hf(ids).logits
        tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, eos_token_id=EOS)
    return family, model_dir, ids, logits, tokens


@pytest.mark.parametrize("placement", ["resident", "cpu_disk", "disk", "three_tiers", "three_tiers_sliced"])
def test_parity(reference, placement, monkeypatch):
    family, model_dir, ids, ref_logits, ref_tokens = reference
    if placement == "three_tiers_sliced":
        # slices of 4 KiB: every tensor bigger than that reaches the gpu, and lm_head the logits, in pieces
        for module in (weights, plan):
            monkeypatch.setattr(module, "LM_HEAD_CHUNK_BYTES", 4096)
        placement = "three_tiers"
    kwargs = _plan(placement, model_dir)
    model = load_offloaded(model_dir, **kwargs)
    if placement == "resident":
        assert set(model.plan.tiers.values()) == {"cpu"}
    else:
        assert model.plan == kwargs["plan"]

    logits = model(ids).logits
    assert logits.shape == ref_logits.shape
    err = (logits - ref_logits).abs().max().item()
    assert err <= ATOL, f"{family}/{placement}: max |Δlogit| {err:.2e}"

    tokens = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
                            pad_token_id=0)
    assert torch.equal(tokens, ref_tokens), f"{family}/{placement}: greedy tokens differ\n{tokens}\n{ref_tokens}"

    assert not over_budget(model), f"{family}/{placement}: {over_budget(model)}"
    if placement == "three_tiers":
        assert model.accountant.snapshot()["gpu"]["peak_bytes"] > 0


def test_every_family_is_registered():
    assert set(supported_model_types()) >= {f["model_type"] for f in FAMILIES.values()}


def test_unknown_model_type(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "llama")
    edit_config(model_dir, model_type="gpt_neox_tiny")
    with pytest.raises(HeteroError) as e:
        load_offloaded(model_dir, device="cpu")
    msg = str(e.value)
    assert "gpt_neox_tiny" in msg
    for t in ("llama", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert t in msg


def test_sliding_window_is_refused(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "qwen3")
    edit_config(model_dir, use_sliding_window=True, sliding_window=16)
    with pytest.raises(HeteroError, match="sliding-window"):
        load_offloaded(model_dir, device="cpu")


@pytest.mark.parametrize("family, field", [("llama", "intermediate_size"), ("qwen2_moe", "intermediate_size"),
                                           ("qwen3_moe", "moe_intermediate_size"), ("mixtral", "intermediate_size")])
def test_config_shapes_must_match_weights(tmp_path, family, field):
    model_dir, hf = tiny_checkpoint(tmp_path, family)
    edit_config(model_dir, **{field: getattr(hf.config, field) + 8})
    with pytest.raises(HeteroError, match="does not match the weights"):
        load_offloaded(model_dir, device="cpu")


def test_fused_expert_checkpoint_is_refused(tmp_path):
    """transformers 5 holds experts fused in memory; a checkpoint saved that way must fail clearly."""
    from safetensors.torch import load_file, save_file

    model_dir, _ = tiny_checkpoint(tmp_path, "qwen3_moe")
    path = model_dir / "model.safetensors"
    state = load_file(path)
    for layer in (1, 3):
        prefix = f"model.layers.{layer}.mlp.experts"
        n = FAMILIES["qwen3_moe"]["num_experts"]
        gate = [state.pop(f"{prefix}.{e}.gate_proj.weight") for e in range(n)]
        up = [state.pop(f"{prefix}.{e}.up_proj.weight") for e in range(n)]
        down = [state.pop(f"{prefix}.{e}.down_proj.weight") for e in range(n)]
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        state[f"{prefix}.down_proj"] = torch.stack(down)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(HeteroError, match="fused"):
        load_offloaded(model_dir, device="cpu")


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_sliding_window_matches_transformers(tmp_path, family):
    model_dir, hf = tiny_checkpoint(tmp_path, family, sliding_window=8)
    ids = torch.randint(2, VOCAB - 1, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref_logits = hf(ids).logits
        ref_tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0, eos_token_id=EOS)
    model = load_offloaded(model_dir, **_plan("cpu_disk", model_dir))
    assert (model(ids).logits - ref_logits).abs().max().item() <= ATOL
    tokens = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_takes_the_matrix_vector_path_with_the_same_result(dtype):
    from hetero.models.common import linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g).to(dtype)
    for shape in [(1, 1, 64), (64,), (3, 64), (2, 1, 64)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w)), (dtype, shape)
