"""Calibrated routing predictor: the least-squares fit, recall, and the saved file round trip."""

import numpy as np
import pytest
import torch

from hetero.errors import HeteroError
from hetero.experts.calibrate import calibrate, overlap, recall
from hetero.experts.predictor import PREDICTOR_FILE, LinearPredictor, SpeculativeGating, load_predictor
from hetero.experts.trace import RoutingTrace


def _synthetic(N=3000, C=24, E=8, k=2, layers=4, seed=0):
    """A trace whose MoE inputs drift by a fixed linear map per layer (plus a little noise), and its routers.

    Speculative gating (router of l+1 on x_l) misses the drift; a fitted map can undo it.
    """
    g = torch.Generator().manual_seed(seed)
    routers = {l: torch.randn(E, C, generator=g) for l in range(layers)}
    drift = torch.linalg.qr(torch.randn(C, C, generator=g))[0]  # a rotation: x_{l+1} = x_l R + noise
    xs = [torch.randn(N, C, generator=g)]
    for _ in range(layers - 1):
        xs.append(xs[-1] @ drift + 0.05 * torch.randn(N, C, generator=g))
    idx, w, x = {}, {}, {}
    for l in range(layers):
        probs = torch.softmax(xs[l].half().float() @ routers[l].T, -1)
        wl, il = torch.topk(probs, k, -1)
        idx[l], w[l], x[l] = il.numpy(), wl.numpy(), xs[l].half().numpy()
    return RoutingTrace(E, k, idx, w, x, {"model": "synthetic"}), routers


def test_overlap_counts_true_experts_among_the_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    idx = torch.tensor([[1, 0], [0, 3]])
    assert overlap(scores, idx).tolist() == [1.0, 0.5]


def test_calibrated_maps_beat_speculative_gating_on_unseen_tokens(tmp_path):
    trace, routers = _synthetic()
    fit, test = trace.slice(0, 2000), trace.slice(2000, 3000)
    pred = calibrate(fit, routers, depths=3, fingerprint="abc")
    spec = SpeculativeGating(routers, trace.top_k, 3)
    for d in (1, 2, 3):
        got, base = recall(pred, test, d), recall(spec, test, d)
        assert sorted(got) == list(range(d, 4))  # keyed by the predicted (target) layer
        assert min(got.values()) >= 0.9, (d, got)
        assert np.mean(list(got.values())) > np.mean(list(base.values())) + 0.1, (d, got, base)
    assert set(pred.maps) == {(l, d) for l in range(4) for d in (1, 2, 3) if l + d < 4}
    assert pred.meta["tokens"] == 2000 and set(pred.meta["holdout_recall"]) == {"1", "2", "3"}
    # a fitted scale makes confident forecasts: the true experts of a token get high probability
    x0 = torch.from_numpy(test.x[0]).float()
    p = pred.token_scores(0, 1, x0)
    picked = torch.zeros_like(p, dtype=torch.bool).scatter_(1, torch.from_numpy(test.idx[1]).long(), True)
    assert p[picked].mean() > 0.8 and p[~picked].mean() < 0.2
    # round trip through the file keeps every forecast
    pred.save(tmp_path / PREDICTOR_FILE)
    back = LinearPredictor.load(tmp_path / PREDICTOR_FILE, routers, trace.top_k, 3)
    assert back.meta == pred.meta and back.scales == pred.scales
    for l, got in pred.predict(0, x0[:5]).items():
        assert torch.equal(got, back.predict(0, x0[:5])[l])


def test_prior_only_when_the_inputs_do_not_drift():
    """x is the same in every layer: speculative gating is exact, and the fit must not make it worse."""
    trace, routers = _synthetic(N=400, layers=3)
    same = {l: trace.x[0] for l in trace.layers}
    idx = {}
    for l in trace.layers:
        idx[l] = torch.topk(torch.from_numpy(same[l]).float() @ routers[l].T, 2, -1).indices.numpy()
    trace = RoutingTrace(8, 2, idx, trace.w, same)
    pred = calibrate(trace, routers, depths=2)
    for d in (1, 2):
        assert min(recall(pred, trace, d).values()) >= 0.99
        assert min(recall(SpeculativeGating(routers, 2, 2), trace, d).values()) == 1.0


def test_calibrate_refuses_bad_traces():
    trace, routers = _synthetic(N=400)
    with pytest.raises(HeteroError, match="not the model's"):
        calibrate(trace, {l: r for l, r in routers.items() if l != 3})
    with pytest.raises(HeteroError, match="at least"):
        calibrate(trace.slice(0, 30), routers)
    no_x = RoutingTrace(trace.num_experts, trace.top_k, trace.idx, trace.w, None)
    with pytest.raises(HeteroError, match="no MoE inputs"):
        calibrate(no_x, routers)
    with pytest.raises(HeteroError, match="no MoE inputs"):
        recall(SpeculativeGating(routers, 2, 1), no_x, 1)


def test_load_predictor_reads_a_calibrated_file(tmp_path):
    from helpers import tiny_checkpoint
    from test_predictor import _routers
    from hetero.experts.predictor import model_fingerprint

    model_dir, _ = tiny_checkpoint(tmp_path, "mixtral")
    args, routers = _routers(model_dir)
    trace, _ = _synthetic(N=200, C=args.hidden_size, E=args.num_experts, layers=len(routers))
    pred = calibrate(trace, routers, depths=1, fingerprint=model_fingerprint(model_dir, routers))
    pred.save(model_dir / PREDICTOR_FILE)
    assert load_predictor(model_dir, routers, 2, 1).kind == "calibrated"


def test_expert_recall_counts_each_experts_uses():
    from hetero.experts.calibrate import expert_recall

    # layer 0 predicts layer 1: experts 0 and 1 always predicted; layer 1 truly routes (0, 2) then (0, 1)
    trace = RoutingTrace(4, 2, {0: np.array([[0, 1], [0, 1]]), 1: np.array([[0, 2], [0, 1]])},
                         {0: np.ones((2, 2), np.float32), 1: np.ones((2, 2), np.float32)},
                         x={0: np.zeros((2, 3), np.float32), 1: np.zeros((2, 3), np.float32)})

    class Fixed:
        def token_scores(self, layer, depth, x):
            return torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(x.shape[0], 4) if layer == 0 else None

    got = expert_recall(Fixed(), trace, 1)
    # expert 0: 2 of 2 uses predicted, 1: 1 of 1, 2: 0 of 1; 3, never used, takes the layer's 3 of 4
    assert list(got) == [1] and got[1] == pytest.approx([1.0, 1.0, 0.0, 0.75])


def test_calibrated_recall_is_the_matching_predictors_heldout_figure(tmp_path):
    from helpers import tiny_checkpoint
    from test_predictor import _routers
    from hetero.checkpoint.catalogue import Catalogue
    from hetero.config import ModelArgs
    from hetero.experts.predictor import model_fingerprint
    from hetero.experts.recording import calibrated_recall
    from hetero.models import family_for

    model_dir, _ = tiny_checkpoint(tmp_path, "mixtral")
    args, routers = _routers(model_dir)
    model, cat = family_for(args).build(ModelArgs.from_dir(model_dir)), Catalogue(model_dir)
    try:
        assert calibrated_recall(model_dir, cat, model) == 0.0  # no predictor: nothing is taken as read ahead
        trace, _ = _synthetic(N=200, C=args.hidden_size, E=args.num_experts, layers=len(routers))
        pred = calibrate(trace, routers, depths=1, fingerprint=model_fingerprint(model_dir, routers))
        pred.meta = {"heldout_recall": {"1": 0.875}}
        pred.save(model_dir / PREDICTOR_FILE)
        assert calibrated_recall(model_dir, cat, model) == 0.875
        pred.meta = {"heldout_recall": {"1": 0.875}, "heldout_expert_recall": {"1": [0.5, 1.0]}}
        pred.save(model_dir / PREDICTOR_FILE)
        assert calibrated_recall(model_dir, cat, model) == {1: [0.5, 1.0]}  # per expert, when the file has it
        pred.meta = {"heldout_expert_recall": {"1": ["high", None]}}
        pred.save(model_dir / PREDICTOR_FILE)
        assert calibrated_recall(model_dir, cat, model) == 0.0  # unreadable figures are none, not an error
        calibrate(trace, routers, depths=1, fingerprint="another model").save(model_dir / PREDICTOR_FILE)
        assert calibrated_recall(model_dir, cat, model) == 0.0
    finally:
        cat.close()
