"""Routing traces: which experts every token picked in every MoE layer, recorded as a model runs.

A trace is the input of the replay tool (cache policies against Belady's optimum), of activation
frequencies for the planner, and, with the MoE inputs kept, of the predictor's calibration.
Stored as safetensors with JSON metadata (never pickled), written to a temporary name and renamed.

Shape legend: N tokens recorded, k experts per token, C hidden size, E experts, L MoE layers.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import HeteroError

FORMAT = "hetero-routing-trace/1"


def write_atomic(path: Path, write, what: str) -> Path:
    """Call write(tmp) on a temporary name beside `path`, then rename it over `path`: a reader never
    sees a half-written file. An OSError becomes a HeteroError naming `what`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise HeteroError(f"{path}: cannot write {what} ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


class RoutingTrace:
    """The routing of N tokens through the MoE layers, in the order the tokens ran.

    Attributes:
        num_experts: E.
        top_k: k.
        layers: sorted MoE layer indices.
        idx: {layer: [N, k] int16 expert ids}.
        w: {layer: [N, k] float32 routing weights}.
        x: {layer: [N, C] float16 MoE inputs} or None when they were not kept.
        meta: free-form JSON-able facts (model, fingerprint, text, expert_bytes, ...).
    """

    def __init__(self, num_experts: int, top_k: int, idx: dict, w: dict, x: dict | None = None,
                 meta: dict | None = None):
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.layers = sorted(int(l) for l in idx)
        self.idx = {l: np.ascontiguousarray(idx[l], dtype=np.int16) for l in self.layers}
        self.w = {l: np.ascontiguousarray(w[l], dtype=np.float32) for l in self.layers}
        self.x = None if not x else {l: np.ascontiguousarray(x[l], dtype=np.float16) for l in self.layers}
        self.meta = dict(meta or {})
        counts = {a.shape[0] for a in (*self.idx.values(), *self.w.values(), *(self.x or {}).values())}
        if len(counts) > 1:
            raise HeteroError(f"routing trace: layers recorded different numbers of tokens {sorted(counts)}")
        for l in self.layers:
            if self.idx[l].shape[1:] != (self.top_k,) or self.w[l].shape != self.idx[l].shape:
                raise HeteroError(f"routing trace: layer {l} has idx {self.idx[l].shape}, w {self.w[l].shape} "
                                  f"for top-{self.top_k}")
            if self.idx[l].size and (self.idx[l].min() < 0 or self.idx[l].max() >= self.num_experts):
                raise HeteroError(f"routing trace: layer {l} names experts outside 0..{self.num_experts - 1}")

    @property
    def num_tokens(self) -> int:
        return self.idx[self.layers[0]].shape[0] if self.layers else 0

    def frequencies(self) -> np.ndarray:
        """[L, E] float64: the share of tokens that picked each expert, per MoE layer (in `layers` order)."""
        out = np.zeros((len(self.layers), self.num_experts))
        n = max(self.num_tokens, 1)
        for i, l in enumerate(self.layers):
            out[i] = np.bincount(self.idx[l].reshape(-1).astype(np.int64), minlength=self.num_experts) / n
        return out

    def slice(self, start: int, stop: int, copy: bool = False) -> "RoutingTrace":
        """Tokens [start, stop) as a new trace (e.g. to fit on one part and measure on another): views of
        this one's arrays, or copies that do not keep the whole trace alive (copy=True)."""
        sl = lambda d: None if d is None else {l: a[start:stop].copy() if copy else a[start:stop]  # noqa: E731
                                               for l, a in d.items()}
        return RoutingTrace(self.num_experts, self.top_k, sl(self.idx), sl(self.w), sl(self.x), self.meta)

    def save(self, path) -> Path:
        """Write to `path` (safetensors + JSON metadata) through a temporary file and a rename."""
        from safetensors.numpy import save_file

        path = Path(path)
        arrays = {}
        for l in self.layers:
            arrays[f"idx.{l}"], arrays[f"w.{l}"] = self.idx[l], self.w[l]
            if self.x is not None:
                arrays[f"x.{l}"] = self.x[l]
        meta = {"format": FORMAT, "num_experts": self.num_experts, "top_k": self.top_k, "layers": self.layers,
                "num_tokens": self.num_tokens, "meta": self.meta}
        return write_atomic(path, lambda tmp: save_file(arrays, str(tmp), metadata={"hetero": json.dumps(meta)}),
                            "the routing trace")

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        """Read a trace written by `save`; HeteroError when the file is missing or not a trace."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise HeteroError(f"{path}: no such routing trace")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = json.loads((f.metadata() or {}).get("hetero", "{}"))
                if meta.get("format") != FORMAT:
                    raise HeteroError(f"{path}: not a hetero routing trace")
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
            raise HeteroError(f"{path}: unreadable routing trace ({e})") from None
        layers = [int(l) for l in meta["layers"]]
        x = {l: arrays[f"x.{l}"] for l in layers} if all(f"x.{l}" in arrays for l in layers) and layers else None
        return cls(meta["num_experts"], meta["top_k"], {l: arrays[f"idx.{l}"] for l in layers},
                   {l: arrays[f"w.{l}"] for l in layers}, x, meta.get("meta"))


class TraceRecorder:
    """A routing observer (append it to `executor.routing_observers`) that records a RoutingTrace.

    Args:
        keep_x: also keep every MoE input (float16, N x C per layer) for calibrating a predictor.
        num_experts: E (default: taken from `meta["num_experts"]`, else the largest id seen + 1 —
            pass it when some experts may never be picked).
        meta: facts to store with the trace.
    """

    def __init__(self, keep_x: bool = False, num_experts: int | None = None, meta: dict | None = None):
        self.keep_x, self.num_experts, self.meta = keep_x, num_experts, dict(meta or {})
        self._idx, self._w, self._x = {}, {}, {}

    @classmethod
    def for_model(cls, model, keep_x: bool = False, meta: dict | None = None) -> "TraceRecorder":
        """A recorder for a loaded OffloadedModel, with its expert count and identity in the metadata."""
        args = model.config
        meta = {"model": str(model.path), "model_type": args.model_type, **(meta or {})}
        return cls(keep_x, args.num_experts, meta)

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
        """Observer: x [N, C] the MoE input, idx [N, k] expert ids, w [N, k] routing weights."""
        self._idx.setdefault(layer, []).append(idx.detach().to("cpu", torch.int16).numpy())
        self._w.setdefault(layer, []).append(w.detach().to("cpu", torch.float32).numpy())
        if self.keep_x:
            self._x.setdefault(layer, []).append(x.detach().to("cpu", torch.float16).reshape(-1, x.shape[-1]).numpy())

    def trace(self) -> RoutingTrace:
        """Everything recorded so far as a RoutingTrace."""
        if not self._idx:
            raise HeteroError("routing trace: nothing was recorded (is the model an MoE, and did it run?)")
        idx = {l: np.concatenate(a) for l, a in self._idx.items()}
        w = {l: np.concatenate(a) for l, a in self._w.items()}
        x = {l: np.concatenate(a) for l, a in self._x.items()} if self.keep_x else None
        E = self.num_experts or self.meta.get("num_experts") or 1 + max(int(a.max()) for a in idx.values())
        k = next(iter(idx.values())).shape[1]
        return RoutingTrace(E, k, idx, w, x, self.meta)
