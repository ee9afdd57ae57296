"""Routing prediction: which experts the next MoE layers will pick, from the current layer's MoE input.

Every supported family routes the same way: softmax over the router logits, then the top-k (the
renormalisation some families apply afterwards changes the weights, not the choice; Qwen2-MoE's
shared expert is always used and never routed). So a predictor forecasts the router logits z of a
later layer and turns them into "is expert e among this token's top-k": with tau the midpoint
between the k-th and (k+1)-th largest forecast logits, P(e) = sigmoid((z_e - tau) / s), where s is
the forecast's error scale (fitted on a trace for the calibrated predictor). The k experts with the
highest forecast logits are exactly those with P > 1/2, as in the model's own top-k.

Two predictors, one protocol (`lookahead`, `nbytes`, `predict`):
    SpeculativeGating   the routers of layers l+1..l+L applied to layer l's MoE input
    LinearPredictor     per (layer, depth) linear maps fitted by ridge least squares on a routing
                        trace (hetero/experts/calibrate.py), stored as routing-predictor.safetensors
                        next to the model; `load_predictor` falls back to speculative gating when
                        no matching file exists.

Shape legend: N tokens, C hidden size, E experts, k experts per token.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Protocol

import torch

from ..errors import HeteroError
from .trace import write_atomic

log = logging.getLogger("hetero")
PREDICTOR_FILE = "routing-predictor.safetensors"
FORMAT = "hetero-routing-predictor/1"
DEFAULT_SCALE = 1.0  # error scale (in logits) assumed for speculative gating, which has no trace to fit one on


class RoutingPredictor(Protocol):
    lookahead: int
    nbytes: int

    def predict(self, layer: int, x: torch.Tensor) -> dict[int, torch.Tensor]:
        ...


def read_routers(catalogue, model) -> dict[int, torch.Tensor]:
    """The router weights of every MoE layer, read from the checkpoint into float32 host tensors.

    Args:
        catalogue: the checkpoint's hetero.checkpoint.catalogue.Catalogue.
        model: the family's CausalLM (meta weights are enough: only module names are used), or a
            loaded OffloadedModel.
    Returns:
        {layer index: router weight [E, C] float32}, sorted by layer.
    """
    from ..models.common import SparseMoE

    model = model.executor.model if hasattr(model, "executor") else model
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, SparseMoE):
            continue
        key = f"{name}.gate.weight"
        if key not in catalogue:
            raise HeteroError(f"{catalogue.model_dir}: the checkpoint has no router {key}")
        w = catalogue.read(key).float()
        if w.shape != tuple(module.gate.weight.shape):
            raise HeteroError(f"{catalogue.model_dir}: router {key} has shape {tuple(w.shape)}, "
                              f"expected {tuple(module.gate.weight.shape)}")
        out[module.layer_idx] = w
    return dict(sorted(out.items()))


def pick_probability(logits: torch.Tensor, top_k: int, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """Per token, the probability that each expert is among the top-k, from forecast router logits.

    Args:
        logits: [..., E] forecast router logits (softmax is monotone, so top-k of logits = top-k of probs),
            e.g. [N, E], or [N, D, E] for D later layers at once.
        top_k: experts per token.
        scale: the forecast's error scale in logits (smaller means more confident): a float, or a tensor
            that broadcasts against [..., 1] (one scale per later layer: [D, 1]).
    Returns:
        [..., E] float32 in (0, 1); the k largest logits of a token are exactly its entries above 1/2.
    """
    z = logits.float()
    E = z.shape[-1]
    if top_k >= E:
        return torch.ones_like(z)
    top = torch.topk(z, top_k + 1, dim=-1).values  # [..., k+1], descending
    tau = (top[..., top_k - 1: top_k] + top[..., top_k: top_k + 1]) / 2  # [..., 1] between k-th and (k+1)-th
    return torch.sigmoid((z - tau) / scale)


def any_token_probability(p: torch.Tensor) -> torch.Tensor:
    """[N, ..., E] per-token pick probabilities -> [..., E] probability that at least one token picks each expert."""
    # 1 - prod_n (1 - p_n), in logs so a long prefill does not underflow the product
    return -torch.expm1(torch.log1p(-p.clamp(max=1 - 1e-7)).sum(0))


class SpeculativeGating:
    """Apply the routers of layers l+1..l+lookahead to layer l's MoE input.

    Args:
        routers: {layer: router weight [E, C] float32}, as read_routers returns.
        top_k: experts per token.
        lookahead: how many layers ahead to predict.
        scale: error scale of the forecast logits (pick_probability).
    """

    kind = "speculative"

    def __init__(self, routers: dict[int, torch.Tensor], top_k: int, lookahead: int, scale: float = DEFAULT_SCALE):
        if lookahead < 1:
            raise HeteroError(f"lookahead {lookahead}: must be at least 1")
        self.routers = {int(l): w.float() for l, w in routers.items()}
        self.top_k, self.lookahead, self.scale = top_k, lookahead, scale
        self.nbytes = sum(w.nbytes for w in self.routers.values())
        self._scales: dict = {}  # layer -> (later MoE layers predicted from it, their error scales [D, 1])

    def logits(self, layer: int, depth: int, x: torch.Tensor) -> torch.Tensor | None:
        """Forecast router logits [N, E] of layer `layer + depth` from x [N, C] (None if it is not MoE)."""
        w = self.routers.get(layer + depth)
        return None if w is None else x.float() @ w.T

    def error_scale(self, layer: int, depth: int) -> float:
        return self.scale

    def token_scores(self, layer: int, depth: int, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token pick probabilities [N, E] for layer `layer + depth` (None if it is not an MoE layer)."""
        z = self.logits(layer, depth, x)
        return None if z is None else pick_probability(z, self.top_k, self.error_scale(layer, depth))

    def predict(self, layer: int, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Score the experts of the MoE layers layer+1..layer+lookahead.

        Args:
            layer: the layer whose MoE input `x` is.
            x: [N, C] that layer's MoE input (after post_attention_layernorm).
        Returns:
            {later MoE layer: [E] float32 probability that at least one of the N tokens picks each expert}.
        """
        if layer not in self._scales:
            targets = [layer + d for d in range(1, self.lookahead + 1) if layer + d in self.routers]
            scales = torch.tensor([[self.error_scale(layer, t - layer)] for t in targets])
            self._scales[layer] = (targets, scales)
        targets, scales = self._scales[layer]
        if not targets:
            return {}
        x = x.float()
        # the later layers' forecasts scored together: one top-k, sigmoid and product over tokens for
        # all of them (run once per MoE layer of every decoded token, the per-op overhead is the cost)
        zs = [self.logits(layer, t - layer, x) for t in targets]
        z = zs[0][:, None] if len(zs) == 1 else torch.stack(zs, dim=1)  # [N, D, E]
        return dict(zip(targets, any_token_probability(pick_probability(z, self.top_k, scales))))


class LinearPredictor(SpeculativeGating):
    """Per (source MoE layer l, depth d) a fitted affine map x_l [C] -> router logits of layer l+d [E].

    (Mapping x_l to the router's input x_{l+d} and applying the true router gives the same least-
    squares fit, since the router is linear: the logit map is kept because it is E/C times smaller.)
    Pairs without a fitted map fall back to speculative gating.

    Args:
        routers: {layer: router weight [E, C] float32}.
        top_k: experts per token.
        lookahead: how many layers ahead to predict.
        maps: {(l, d): (weight [E, C], bias [E])} float32.
        scales: {(l, d): fitted error scale}; missing pairs use DEFAULT_SCALE.
        fingerprint: the model fingerprint the maps were fitted for (model_fingerprint).
        meta: free-form facts kept in the file (trace size, recall at fit time).
    """

    kind = "calibrated"

    def __init__(self, routers, top_k: int, lookahead: int, maps: dict, scales: dict | None = None,
                 fingerprint: str = "", meta: dict | None = None):
        super().__init__(routers, top_k, lookahead)
        self.maps = {(int(l), int(d)): (w.float().contiguous(), b.float().contiguous()) for (l, d), (w, b) in maps.items()}
        self.scales = {(int(l), int(d)): float(s) for (l, d), s in (scales or {}).items()}
        self.fingerprint, self.meta = fingerprint, dict(meta or {})
        self.nbytes += sum(w.nbytes + b.nbytes for w, b in self.maps.values())

    @property
    def depths(self) -> int:
        return max((d for _, d in self.maps), default=0)

    def logits(self, layer: int, depth: int, x: torch.Tensor) -> torch.Tensor | None:
        m = self.maps.get((layer, depth))
        if m is None or (layer + depth) not in self.routers:
            return super().logits(layer, depth, x)
        w, b = m
        return x.float() @ w.T + b

    def error_scale(self, layer: int, depth: int) -> float:
        return self.scales.get((layer, depth), DEFAULT_SCALE)

    def with_lookahead(self, lookahead: int) -> "LinearPredictor":
        return LinearPredictor(self.routers, self.top_k, lookahead, self.maps, self.scales, self.fingerprint, self.meta)

    def save(self, path: Path):
        """Write the maps to `path` (safetensors, JSON metadata), through a temporary file and a rename."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for (l, d), (w, b) in sorted(self.maps.items()):
            tensors[f"map.{l}.{d}.weight"], tensors[f"map.{l}.{d}.bias"] = w, b
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "top_k": self.top_k,
                "scales": {f"{l}.{d}": s for (l, d), s in sorted(self.scales.items())}, "meta": self.meta}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"hetero": json.dumps(meta)}),
                     "the routing predictor")

    @staticmethod
    def header(path: Path, tensors: bool = False) -> tuple[dict, dict]:
        """(the file's metadata, its tensors when `tensors`, else {}); HeteroError when it is not a predictor."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("hetero", "{}"))
                if meta.get("format") != FORMAT:
                    raise HeteroError(f"{path}: not a hetero routing predictor (format {meta.get('format')!r})")
                return meta, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
        except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
            raise HeteroError(f"{path}: unreadable routing predictor ({e})") from None

    @classmethod
    def load(cls, path: Path, routers, top_k: int, lookahead: int) -> "LinearPredictor":
        """Read a file written by `save`. Raises HeteroError when it is unreadable or not a predictor."""
        path = Path(path)
        meta, tensors = cls.header(path, tensors=True)
        maps = {}
        for key, w in tensors.items():
            _, l, d, part = key.split(".")
            if part == "weight":
                maps[(int(l), int(d))] = (w, tensors[f"map.{l}.{d}.bias"])
        scales = {tuple(int(v) for v in k.split(".")): s for k, s in meta.get("scales", {}).items()}
        if int(meta.get("top_k", top_k)) != top_k:
            raise HeteroError(f"{path}: fitted for top-{meta.get('top_k')} routing, the model routes top-{top_k}")
        for (l, d), (w, b) in maps.items():
            r = routers.get(l + d)
            if r is None or w.shape != r.shape or b.shape != (r.shape[0],):
                raise HeteroError(f"{path}: map {l}->{l + d} does not fit this model's routers")
        return cls(routers, top_k, lookahead, maps, scales, meta.get("fingerprint", ""), meta.get("meta"))


def checkpoint_routers(model_dir) -> tuple:
    """(ModelArgs, read_routers(...)) of a model directory, from its config and router tensors alone
    (no model is loaded; the module names come from the family's meta-weight build)."""
    from ..checkpoint.catalogue import Catalogue
    from ..config import ModelArgs
    from ..models import family_for

    args = ModelArgs.from_dir(model_dir)
    cat = Catalogue(model_dir)
    try:
        return args, read_routers(cat, family_for(args).build(args))
    finally:
        cat.close()


def model_fingerprint(model_dir: Path, routers: dict[int, torch.Tensor]) -> str:
    """A short hash of config.json (parsed, key order ignored) and the router weights' bytes.

    A predictor whose fingerprint differs was fitted on another model (or another copy of its routers).
    """
    cfg = Path(model_dir) / "config.json"
    try:
        config = json.dumps(json.loads(cfg.read_text()), sort_keys=True)
    except (OSError, json.JSONDecodeError) as e:
        raise HeteroError(f"{cfg}: cannot read the model config ({e})") from None
    h = hashlib.sha256(config.encode())
    for layer, w in sorted(routers.items()):
        h.update(str(layer).encode())
        h.update(w.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def load_predictor(model_dir, routers: dict[int, torch.Tensor], top_k: int, lookahead: int,
                   notes: list | None = None) -> RoutingPredictor:
    """The calibrated predictor when a matching routing-predictor.safetensors sits next to the model,
    else speculative gating.

    Args:
        model_dir: the model's directory.
        routers: read_routers(...) of that model.
        top_k: experts per token.
        lookahead: layers to predict ahead.
        notes: a list to append a one-line note to when a predictor file exists but is ignored.
    Returns:
        A LinearPredictor or a SpeculativeGating (its `kind` says which).
    """
    path = Path(model_dir) / PREDICTOR_FILE
    if not path.is_file():
        return SpeculativeGating(routers, top_k, lookahead)
    note = None
    try:
        pred = LinearPredictor.load(path, routers, top_k, lookahead)
        if pred.fingerprint == model_fingerprint(model_dir, routers):
            return pred
        note = f"{path.name} was fitted for another model or other router weights; using speculative gating " \
               f"(run `hetero calibrate {model_dir}` again)"
    except HeteroError as e:
        note = f"{e}; using speculative gating"
    log.info(note)
    if notes is not None:
        notes.append(note)
    return SpeculativeGating(routers, top_k, lookahead)
