"""Fitting the calibrated routing predictor on a trace, and measuring any predictor's recall.

For each MoE layer l and depth d (1..depths) with an MoE layer l+d, a map x_l -> router logits of
layer l+d is fitted by ridge least squares, shrunk towards speculative gating (the router of l+d
applied to x_l) rather than towards zero, so that a short trace cannot do worse than the prior:

    logits_hat = x_l @ (W_{l+d} + D)^T + b,   D, b = argmin |X D^T + b - (Y - X W^T)|^2 + lam |D|^2

The ridge strength lam of each pair is picked from a grid by the recall on the last `holdout` share
of the trace's tokens (fit on the rest), as is the error scale turning logits into pick probabilities;
then the map is refitted on every token.

Shape legend: N tokens, C hidden size, E experts, k experts per token.
"""

import numpy as np
import torch

from ..errors import HeteroError
from .predictor import LinearPredictor, pick_probability

RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, None)  # x mean eigenvalue of the inputs' covariance; None: prior only
SCALES = tuple(float(s) for s in np.geomspace(0.05, 20, 25))  # error scales tried, in logits


def overlap(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per token, the share of its true experts among the k highest scores.

    Args:
        scores: [N, E] predicted scores (logits or probabilities: only the order matters).
        idx: [N, k] the experts each token truly picked.
    Returns:
        [N] float32 in [0, 1].
    """
    k = idx.shape[1]
    pred = torch.topk(scores, k, dim=-1).indices  # [N, k]
    hit = (pred.unsqueeze(2) == idx.long().unsqueeze(1)).any(2)  # [N, k] predicted expert among the true
    return hit.float().mean(1)


def trace_inputs(trace, layer) -> torch.Tensor:
    """[N, C] float32 the MoE inputs of `layer` a trace kept (HeteroError if it kept none)."""
    if trace.x is None:
        raise HeteroError("this routing trace has no MoE inputs; record it with x kept (hetero calibrate does)")
    return torch.from_numpy(trace.x[layer]).float()


def recall(predictor, trace, lookahead: int) -> dict[int, float]:
    """Decode-style recall of a predictor on a trace: per token, the share of the true top-k experts of
    layer l+lookahead among the k experts scored highest from x_l alone, averaged over tokens.

    Args:
        predictor: a SpeculativeGating or LinearPredictor.
        trace: a RoutingTrace with x kept.
        lookahead: the layer distance d.
    Returns:
        {target layer l+d: recall in [0, 1]} for every MoE layer l whose l+d is an MoE layer.
    """
    return {target: float(overlap(scores, idx).mean()) for target, scores, idx in _forecasts(predictor, trace, lookahead)}


def _forecasts(predictor, trace, lookahead: int):
    """(target layer l+d, its scores [N, E] forecast from x_l, its true experts [N, k]) for every MoE layer
    l whose l+d is an MoE layer the predictor forecasts."""
    for layer in trace.layers:
        target = layer + lookahead
        if target not in trace.idx:
            continue
        scores = predictor.token_scores(layer, lookahead, trace_inputs(trace, layer))
        if scores is not None:
            yield target, scores, torch.from_numpy(trace.idx[target]).long()


def expert_recall(predictor, trace, lookahead: int) -> dict[int, list[float]]:
    """Per expert, the share of its uses that the predictor ranked among the top-k, lookahead layers ahead.

    The experts a cache misses are the rarely used ones, which are harder to predict than the average
    (on the trained fixture, held out: 0.93 overall, 0.87 over the misses of a 30% cache), so the cost
    model takes each expert's own figure.

    Args:
        predictor, trace, lookahead: as for recall().
    Returns:
        {target layer: [E] recall}; an expert the trace never routes to gets its layer's recall.
    """
    out = {}
    E = trace.num_experts
    for target, scores, idx in _forecasts(predictor, trace, lookahead):  # idx [N, k]
        pred = torch.topk(scores, idx.shape[1], dim=-1).indices  # [N, k]
        hit = (idx.unsqueeze(2) == pred.unsqueeze(1)).any(2)  # [N, k]: each true expert among the predicted
        uses = torch.bincount(idx.reshape(-1), minlength=E).double()
        hits = torch.bincount(idx.reshape(-1), weights=hit.reshape(-1).double(), minlength=E)
        mean = float(hits.sum() / uses.sum()) if uses.sum() else 0.0
        out[target] = torch.where(uses > 0, hits / uses.clamp(min=1), torch.full_like(uses, mean)).tolist()
    return out


def _bce(p: torch.Tensor, picked: torch.Tensor) -> float:
    """Mean binary cross-entropy of pick probabilities p against who was picked (both [N, E])."""
    return float(-torch.where(picked, p, 1 - p).clamp(min=1e-6).log().mean())


def _fit_scale(z: torch.Tensor, idx: torch.Tensor, k: int) -> float:
    """The error scale whose pick probabilities best match who was picked (least cross-entropy)."""
    picked = torch.zeros_like(z, dtype=torch.bool).scatter_(1, idx.long(), True)
    return min(SCALES, key=lambda s: _bce(pick_probability(z, k, s), picked))


class _Ridge:
    """Ridge solutions for one input matrix and several right-hand sides / strengths.

    The Gram matrix is formed once (float32 product, float64 solves). One linear solve per strength:
    an eigendecomposition would serve every strength at once, but LAPACK's symmetric eigensolver
    took seconds per 576 x 576 matrix here against tens of milliseconds per solve.
    """

    def __init__(self, X: torch.Tensor):
        self.mx = X.mean(0)
        self.Xc = X - self.mx  # [N, C] centred: the bias is then not penalised
        self.G = (self.Xc.T @ self.Xc).double()  # [C, C]
        self.unit = float(torch.diagonal(self.G).mean())  # the mean eigenvalue

    def project(self, R: torch.Tensor):
        """R [N, E] residual targets -> what `solve` needs, computed once for every strength."""
        mr = R.mean(0)
        return (self.Xc.T @ (R - mr)).double(), mr  # [C, E], [E]

    def solve(self, projected, ridge: float):
        """(D [E, C], b [E]) for strength ridge x mean eigenvalue, from project(R)."""
        XtR, mr = projected
        eye = torch.eye(self.G.shape[0], dtype=self.G.dtype)
        D = torch.linalg.solve(self.G + (ridge * self.unit + 1e-12) * eye, XtR).float()  # [C, E]
        return D.T.contiguous(), mr - self.mx @ D


def calibrate(trace, routers: dict[int, torch.Tensor], depths: int = 3, holdout: float = 0.2,
              fingerprint: str = "", meta: dict | None = None, lookahead: int | None = None) -> LinearPredictor:
    """Fit a LinearPredictor on a trace recorded with x kept.

    Args:
        trace: RoutingTrace with `x` (hetero.experts.trace.TraceRecorder(keep_x=True)).
        routers: {layer: router weight [E, C] float32} of the traced model.
        depths: the largest layer distance to fit maps for.
        holdout: share of the trace's (last) tokens used to choose each map's ridge strength and scale.
        fingerprint: the model's fingerprint (predictor.model_fingerprint), stored with the maps.
        meta: facts to store with the predictor (its `meta`; held-out recall per depth is added).
        lookahead: the predictor's lookahead (default `depths`).
    Returns:
        The fitted LinearPredictor.
    """
    if sorted(routers) != trace.layers:
        raise HeteroError(f"the trace's MoE layers {trace.layers} are not the model's {sorted(routers)}; "
                          "was it recorded on another model?")
    N, k = trace.num_tokens, trace.top_k
    cut = int(N * (1 - holdout))
    if cut < 16 or N - cut < 16:
        raise HeteroError(f"the trace has {N} tokens; calibration needs at least 80")
    maps, scales, chosen = {}, {}, {}
    for layer in trace.layers:
        X = trace_inputs(trace, layer)
        targets = [(d, layer + d) for d in range(1, depths + 1) if layer + d in routers]
        if not targets:
            continue
        fit, full = _Ridge(X[:cut]), None
        for d, t in targets:
            W = routers[t].float()
            Y = trace_inputs(trace, t) @ W.T  # [N, E] the true logits of layer t
            R = Y - X @ W.T  # what speculative gating misses
            idx_h = torch.from_numpy(trace.idx[t][cut:])
            best, projected = None, fit.project(R[:cut])
            for ridge in RIDGES:
                if ridge is None:
                    Dw, b = torch.zeros_like(W), torch.zeros(W.shape[0])
                else:
                    Dw, b = fit.solve(projected, ridge)
                z = X[cut:] @ (W + Dw).T + b
                score = float(overlap(z, idx_h).mean())
                if best is None or score > best[0] + 1e-9:
                    best = (score, ridge, z)
            score, ridge, z = best
            scales[(layer, d)] = _fit_scale(z, idx_h, k)
            chosen[(layer, d)] = (ridge, score)
            if ridge is not None:
                full = full or _Ridge(X)
                Dw, b = full.solve(full.project(R), ridge)
                maps[(layer, d)] = (W + Dw, b)
    held = {}
    for d in range(1, depths + 1):
        vals = [s for (_, dd), (_, s) in chosen.items() if dd == d]
        if vals:
            held[str(d)] = sum(vals) / len(vals)
    meta = {**(meta or {}), "tokens": N, "holdout_tokens": N - cut, "holdout_recall": held,
            "ridges": {f"{l}.{d}": r for (l, d), (r, _) in sorted(chosen.items())}}
    return LinearPredictor(routers, k, lookahead or depths, maps, scales, fingerprint, meta)
