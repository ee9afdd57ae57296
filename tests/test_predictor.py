"""Routing predictors: routers read from checkpoints, family routing reproduced, calibrated-file loading."""

import math

import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.experts.predictor import (PREDICTOR_FILE, LinearPredictor, SpeculativeGating, any_token_probability,
                                      checkpoint_routers, load_predictor, model_fingerprint, pick_probability)
from hetero.experts.trace import TraceRecorder
from helpers import edit_config, spread_plan, tiny_checkpoint

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


_routers = checkpoint_routers  # (args, routers) of a checkpoint directory


def _recorded(model_dir, T=12):
    """Run T random tokens through the loaded model and return (trace with x, routers, top_k)."""
    m = hetero.load_offloaded(model_dir, plan=spread_plan(model_dir, ("cpu",)), dtype="float32")
    rec = TraceRecorder.for_model(m, keep_x=True)
    m.executor.routing_observers.append(rec)
    torch.manual_seed(1)
    m(torch.randint(0, m.config.vocab_size, (1, T)))
    return rec.trace(), _routers(model_dir)[1], m.config.num_experts_per_tok


@pytest.mark.parametrize("family", MOE)
def test_read_routers_match_the_checkpoint(tmp_path, family):
    model_dir, hf = tiny_checkpoint(tmp_path, family)
    args, routers = _routers(model_dir)
    sd = hf.state_dict()
    want = {int(k.split(".")[2]): v for k, v in sd.items() if k.endswith(".gate.weight") and "shared" not in k}
    assert sorted(routers) == sorted(want) and routers
    for layer, w in routers.items():
        assert w.dtype == torch.float32 and w.shape == (args.num_experts, args.hidden_size)
        assert torch.equal(w, want[layer].float())


@pytest.mark.parametrize("family", MOE)
def test_predicted_top_k_is_the_familys_routing(tmp_path, family):
    """Given the true MoE input of a layer, the router forecast picks exactly the experts the model picked."""
    model_dir, _ = tiny_checkpoint(tmp_path, family)
    trace, routers, k = _recorded(model_dir)
    assert trace.layers == sorted(routers)
    for layer in trace.layers:
        x = torch.from_numpy(trace.x[layer]).float()
        p = pick_probability(x @ routers[layer].T, k)  # [N, E]
        picked = torch.zeros_like(p, dtype=torch.bool).scatter_(1, torch.from_numpy(trace.idx[layer]).long(), True)
        # x was kept in float16: allow a token whose k-th and (k+1)-th logits nearly tie to differ
        agree = ((p > 0.5) == picked).all(1).float().mean().item()
        assert agree >= 0.9, (layer, agree)
        # speculative gating from the layer before, applied to this layer's input, is the same forecast
        spec = SpeculativeGating(routers, k, lookahead=1)
        got = spec.predict(layer - 1, x)
        assert list(got) == [layer]
        assert torch.allclose(got[layer], any_token_probability(p))


def test_pick_probability_and_any_token():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 2.5, -3.0]])
    p = pick_probability(logits, 2, scale=1.0)
    assert ((p > 0.5) == torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)).all()
    # threshold halfway between the 2nd and 3rd logits: 0.5 there, sigmoid of the distance elsewhere
    assert math.isclose(p[0, 0].item(), 1 / (1 + math.exp(-2.5)), rel_tol=1e-6)
    sharper = pick_probability(logits, 2, scale=0.1)
    assert (sharper[p > 0.5] > p[p > 0.5]).all() and (sharper[p < 0.5] < p[p < 0.5]).all()
    both = any_token_probability(p)
    assert torch.allclose(both, 1 - (1 - p[0]) * (1 - p[1]), atol=1e-6)
    assert torch.equal(pick_probability(logits, 4), torch.ones_like(logits))
    # a long prefill does not underflow: 10,000 tokens each with a small chance
    many = any_token_probability(torch.full((10000, 3), 1e-3))
    assert torch.allclose(many, torch.full((3,), 1 - (1 - 1e-3) ** 10000), atol=1e-4)


def test_lookahead_covers_only_later_moe_layers():
    routers = {1: torch.randn(4, 8), 3: torch.randn(4, 8), 4: torch.randn(4, 8)}  # dense layers 0 and 2
    x = torch.randn(5, 8)
    assert list(SpeculativeGating(routers, 2, 1).predict(1, x)) == []
    assert list(SpeculativeGating(routers, 2, 2).predict(1, x)) == [3]
    assert list(SpeculativeGating(routers, 2, 3).predict(1, x)) == [3, 4]
    assert list(SpeculativeGating(routers, 2, 3).predict(4, x)) == []
    out = SpeculativeGating(routers, 2, 3).predict(1, x)
    assert all(v.shape == (4,) and v.dtype == torch.float32 and ((v > 0) & (v <= 1)).all() for v in out.values())
    assert SpeculativeGating(routers, 2, 3).nbytes == 3 * 4 * 8 * 4
    with pytest.raises(HeteroError):
        SpeculativeGating(routers, 2, 0)


def test_predict_scores_all_later_layers_at_once_as_each_alone():
    routers = {l: torch.randn(6, 8, generator=torch.Generator().manual_seed(l)) for l in range(4)}
    x = torch.randn(3, 8)
    for pred in (SpeculativeGating(routers, 2, 3, scale=0.7), _fitted(routers, 2, "f").with_lookahead(3)):
        out = pred.predict(0, x)  # depths 1 and 2 fitted (scales 1.5, 2.5), depth 3 speculative
        assert list(out) == [1, 2, 3]
        for d, scores in out.items():  # (from layer 0, layer d is d ahead)
            alone = any_token_probability(pred.token_scores(0, d, x))
            assert torch.allclose(scores, alone, atol=1e-6), (type(pred).__name__, d)


def _fitted(routers, k, fingerprint):
    """A LinearPredictor with arbitrary (but fixed) maps for each MoE layer pair one or two apart."""
    g = torch.Generator().manual_seed(0)
    maps, scales = {}, {}
    for l in routers:
        for d in (1, 2):
            if l + d in routers:
                E, C = routers[l + d].shape
                maps[(l, d)] = (torch.randn(E, C, generator=g), torch.randn(E, generator=g))
                scales[(l, d)] = 0.5 + d
    return LinearPredictor(routers, k, 2, maps, scales, fingerprint, {"tokens": 7})


def test_load_predictor_prefers_a_matching_calibrated_file(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "olmoe", num_hidden_layers=3)
    args, routers = _routers(model_dir)
    k = args.num_experts_per_tok
    notes = []
    assert isinstance(load_predictor(model_dir, routers, k, 2, notes), SpeculativeGating) and not notes

    fitted = _fitted(routers, k, model_fingerprint(model_dir, routers))
    fitted.save(model_dir / PREDICTOR_FILE)
    assert not list(model_dir.glob(".*tmp"))
    got = load_predictor(model_dir, routers, k, 2, notes)
    assert isinstance(got, LinearPredictor) and got.kind == "calibrated" and not notes
    assert got.meta == {"tokens": 7} and got.nbytes == fitted.nbytes > SpeculativeGating(routers, k, 2).nbytes
    x = torch.randn(3, args.hidden_size)
    want, have = fitted.predict(0, x), got.predict(0, x)
    assert list(want) == list(have) == [1, 2]
    for layer in want:
        assert torch.equal(want[layer], have[layer])
    # the fitted maps differ from the routers: the calibrated forecast is not speculative gating's
    assert not torch.allclose(have[1], SpeculativeGating(routers, k, 2).predict(0, x)[1])
    # a pair without a map (layer 2 has no later layer) falls back to speculative gating, here nothing
    assert got.predict(2, x) == {}

    edit_config(model_dir, rms_norm_eps=1e-3)  # another model now: the file is stale
    got = load_predictor(model_dir, routers, k, 2, notes)
    assert isinstance(got, SpeculativeGating) and not isinstance(got, LinearPredictor)
    assert len(notes) == 1 and "calibrate" in notes[0]


def test_load_predictor_ignores_a_corrupt_or_mismatched_file(tmp_path):
    model_dir, _ = tiny_checkpoint(tmp_path, "mixtral")
    args, routers = _routers(model_dir)
    (model_dir / PREDICTOR_FILE).write_bytes(b"not safetensors at all")
    notes = []
    assert type(load_predictor(model_dir, routers, 2, 1, notes)) is SpeculativeGating
    assert len(notes) == 1 and "unreadable" in notes[0]
    # fitted for top-1 routing while the model routes top-2
    _fitted(routers, 1, model_fingerprint(model_dir, routers)).save(model_dir / PREDICTOR_FILE)
    assert type(load_predictor(model_dir, routers, 2, 1, notes)) is SpeculativeGating
    assert "top-1" in notes[-1]
    # other router weights, same config: the fingerprint tells them apart
    other = {l: w + 1 for l, w in routers.items()}
    assert model_fingerprint(model_dir, other) != model_fingerprint(model_dir, routers)
