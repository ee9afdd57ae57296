"""Recording routing traces from a loaded model, and calibrating its routing predictor on one.

What `hetero trace` and `hetero calibrate` run: text -> tokens -> prefill in chunks with a
TraceRecorder attached -> a RoutingTrace (-> a fitted LinearPredictor saved next to the model).
"""

import glob
import time
from pathlib import Path

from ..errors import HeteroError
from .calibrate import calibrate, expert_recall, recall
from .predictor import PREDICTOR_FILE, LinearPredictor, SpeculativeGating, model_fingerprint, read_routers
from .trace import RoutingTrace, TraceRecorder

TRACE_FILE = "routing-trace.safetensors"
CHUNK = 256  # tokens per prefill call: big enough to be fast, small enough to bound activations
LICENCES = ("GPL-3", "Apache-2.0", "GFDL-1.3", "MPL-2.0", "LGPL-3", "Artistic")
DEPTHS = 3
EVAL_SHARE = 0.25  # tail of a calibration trace kept out of the fit, for the recall that is reported


def recorded_trace(model_dir, catalogue, model, notes: list) -> RoutingTrace | None:
    """The routing trace `hetero trace` (or `hetero calibrate`) left next to the model, when it was
    recorded on this model (same config and routers); else None (with a note when one was ignored).

    The planner then places experts by how often they are picked instead of a uniform prior, the
    cost model replays the expert caches on it, and the caches' score policy starts from its frequencies.
    """
    path = Path(model_dir) / TRACE_FILE
    if not path.is_file():
        return None
    try:
        tr = RoutingTrace.load(path)
        if tr.meta.get("fingerprint") == model_fingerprint(model_dir, read_routers(catalogue, model)):
            return tr
        note = f"{path.name} was recorded on another model or other router weights: experts are placed without it"
    except HeteroError as e:
        note = f"{e}: experts are placed without it"
    notes.append(note)
    return None


def calibrated_recall(model_dir, catalogue, model) -> float | dict:
    """1-layer-ahead recall the calibrated predictor next to the model measured on held-out tokens when
    it was fitted (0.0 without a matching one): the share of expert uses the cost model takes as read
    ahead — per expert ({layer: [E]}, cost.Workload.expert_recall) when the file has those figures,
    else one number. (Speculative gating has no measured figure, so it is taken as reading nothing
    ahead.) Reads the file's header only."""
    path = Path(model_dir) / PREDICTOR_FILE
    if not path.is_file():
        return 0.0
    try:
        meta, _ = LinearPredictor.header(path)
    except HeteroError:
        return 0.0
    if meta.get("fingerprint") != model_fingerprint(model_dir, read_routers(catalogue, model)):
        return 0.0
    facts = meta.get("meta") or {}
    per_expert = facts.get("heldout_expert_recall")
    try:
        if per_expert:
            return {int(layer): [min(1.0, max(0.0, float(r))) for r in row] for layer, row in per_expert.items()}
        return float((facts.get("heldout_recall") or {}).get("1") or 0.0)
    except (TypeError, ValueError, AttributeError):  # a hand-edited file: no figure rather than a wrong one
        return 0.0


def sample_text() -> str:
    """A few hundred KB of English prose every Debian-like system carries: its licence texts.

    Returns:
        The text ('' when none of the files exist).
    """
    parts = [Path("/usr/share/common-licenses", n).read_text(errors="ignore") for n in LICENCES
             if Path("/usr/share/common-licenses", n).is_file()]
    parts += [Path(p).read_text(errors="ignore") for p in sorted(glob.glob("/usr/lib/python3*/LICENSE.txt"))]
    return "\n\n".join(parts)


def read_text(path) -> str:
    """The text of a file given with --text; HeteroError when it cannot be read or is empty."""
    p = Path(path)
    try:
        text = p.read_text(errors="ignore")
    except OSError as e:
        raise HeteroError(f"--text {path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise HeteroError(f"--text {path}: the file is empty")
    return text


def expert_bytes(m) -> int:
    """Bytes of one routed expert (gate, up, down) in the model's compute dtype."""
    a = m.config
    return 3 * a.hidden_size * a.moe_intermediate_size * m.dtype.itemsize


def replay_predictor(model_dir, trace, lookahead: int, notes: list):
    """The routing predictor loading would give `model_dir`, for replaying `trace` the runtime's way:
    (predictor, its depth in decoder layers for `lookahead` MoE layers). Reads the config and the
    routers only. HeteroError when the trace was recorded on another model or kept no MoE inputs."""
    from .predictor import checkpoint_routers, load_predictor

    if trace.x is None:
        raise HeteroError("the trace has no MoE inputs to predict from; record it with `hetero trace --keep-x`")
    _, routers = checkpoint_routers(model_dir)
    if not routers:
        raise HeteroError(f"{model_dir}: not a mixture-of-experts model")
    fp = model_fingerprint(model_dir, routers)
    if trace.meta.get("fingerprint", fp) != fp or sorted(routers) != trace.layers:
        raise HeteroError(f"the trace was recorded on another model than {model_dir} (config or router weights differ)")
    moe = sorted(routers)
    span = lookahead * max([b - a for a, b in zip(moe, moe[1:])], default=1)  # as build_manager spans it
    return load_predictor(model_dir, routers, trace.top_k, span, notes), span


def routers_of(m) -> dict:
    """read_routers() of a loaded OffloadedModel (from its own checkpoint catalogue)."""
    return read_routers(m.executor.store.cat, m)


def record(m, text: str, max_tokens: int | None = None, keep_x: bool = False, chunk: int = CHUNK,
           progress=None) -> RoutingTrace:
    """Prefill `text` through a loaded MoE model and return the routing of every token.

    The text runs as one sequence in chunks of `chunk` tokens (a fresh sequence whenever the KV cache
    is full), so each token sees the context before it as in real use.

    Args:
        m: an OffloadedModel of an MoE family.
        text: the text to route.
        max_tokens: keep at most this many tokens of it.
        keep_x: keep the MoE inputs too (needed for calibration).
        progress: callback(done, total) or None.
    Returns:
        The RoutingTrace, with model identity and expert size in its `meta`.
    """
    if not m.config.is_moe:
        raise HeteroError(f"{m.path}: a dense model ({m.config.model_type}), so there is no expert routing to trace")
    if m.tokenizer is None:
        raise HeteroError(f"{m.path}: no tokenizer.json, so the text cannot be tokenized")
    return record_ids(m, spread(m.tokenizer.encode(text), max_tokens), keep_x, chunk, progress)


def spread(ids: list[int], max_tokens: int | None, window: int = 512) -> list[list[int]]:
    """At most `max_tokens` of `ids` as windows spread evenly over the whole text (one sequence each),
    so a long text's every part is sampled rather than its first pages only.

    Returns:
        A list of token-id sequences ([ids] itself when it fits).
    """
    if max_tokens is None or len(ids) <= max_tokens:
        return [ids]
    n = max(1, max_tokens // window)
    size = max_tokens // n
    step = (len(ids) - size) / max(n - 1, 1)
    return [ids[int(i * step): int(i * step) + size] for i in range(n)]


def record_ids(m, ids: list, keep_x: bool = False, chunk: int = CHUNK, progress=None) -> RoutingTrace:
    """record() for token ids instead of text (same Args; `ids` is one sequence of ids, or a list of
    sequences each run from an empty KV cache, in place of `text` and `max_tokens`)."""
    import torch

    if not m.config.is_moe:
        raise HeteroError(f"{m.path}: a dense model ({m.config.model_type}), so there is no expert routing to trace")
    seqs = ids if ids and isinstance(ids[0], list) else [ids]
    ids = [i for s in seqs for i in s]
    if len(ids) < 2:
        raise HeteroError("the text is too short to trace (fewer than 2 tokens)")
    routers = routers_of(m)
    meta = {"tokens": len(ids), "expert_bytes": expert_bytes(m), "dtype": str(m.dtype).removeprefix("torch."),
            "fingerprint": model_fingerprint(m.path, routers)}
    rec = TraceRecorder.for_model(m, keep_x=keep_x, meta=meta)
    ex = m.executor
    ex.routing_observers.append(rec)
    cache = ex.new_cache()
    room = m.context_tokens
    chunk = max(1, min(chunk, room))
    done = 0
    try:
        for seq in seqs:
            if cache.length:
                cache.free()
                cache = ex.new_cache()
            for start in range(0, len(seq), chunk):
                part = seq[start:start + chunk]
                if cache.length + len(part) > room:
                    cache.free()
                    cache = ex.new_cache()
                ex.forward(torch.tensor([part]), cache, last_only=True)
                done += len(part)
                if progress:
                    progress(done, len(ids))
    finally:
        cache.free()
        ex.routing_observers.remove(rec)
    return rec.trace()


def frequency_rows(trace: RoutingTrace, top: int = 3) -> list[tuple]:
    """Per MoE layer: (layer, the `top` most used experts with their token shares, least used share,
    busiest expert's load over an even split)."""
    rows = []
    for l, f in zip(trace.layers, trace.frequencies()):
        order = f.argsort()[::-1]
        even = trace.top_k / trace.num_experts
        rows.append((l, [(int(e), float(f[e])) for e in order[:top]], float(f[order[-1]]), float(f.max() / even)))
    return rows


def calibrate_model(m, text: str, max_tokens: int | None = None, out=None, progress=None) -> dict:
    """Record a trace with x kept, fit the predictor, measure it on held-out tokens, save it.

    The recall reported is that of a fit on the first 75% of the tokens, measured on the rest; the
    saved predictor is then fitted on all of them.

    Args:
        m: a loaded MoE OffloadedModel.
        text: calibration text.
        max_tokens: tokens of it to use.
        out: where to save (default: routing-predictor.safetensors in the model's directory).
        progress: callback(done, total) for the recording.
    Returns:
        {"path", "tokens", "record_s", "fit_s", "recall": {depth: {layer: r}}, "speculative": same,
         "average": {depth: r}, "speculative_average": {depth: r}}.
    """
    t0 = time.perf_counter()
    trace = record(m, text, max_tokens, keep_x=True, progress=progress)
    t1 = time.perf_counter()
    routers = routers_of(m)
    N = trace.num_tokens
    cut = int(N * (1 - EVAL_SHARE))
    if N - cut < 16 or cut < 80:
        raise HeteroError(f"the calibration text gave {N} tokens; give at least 128 (a longer --text)")
    held = trace.slice(cut, N)
    trial = calibrate(trace.slice(0, cut), routers, DEPTHS)
    spec = SpeculativeGating(routers, trace.top_k, DEPTHS)
    res = {"tokens": N, "eval_tokens": N - cut, "record_s": t1 - t0, "recall": {}, "speculative": {},
           "average": {}, "speculative_average": {}}
    for d in range(1, DEPTHS + 1):
        for key, pred in (("recall", trial), ("speculative", spec)):
            r = recall(pred, held, d)
            res[key][d] = r
            res["average" if key == "recall" else "speculative_average"][d] = sum(r.values()) / len(r) if r else None
    fp = model_fingerprint(m.path, routers)
    per_expert = {str(t): r for t, r in expert_recall(trial, held, 1).items()}  # 1 ahead, as heldout_recall's "1"
    final = calibrate(trace, routers, DEPTHS, fingerprint=fp,
                      meta={"text_tokens": N, "heldout_recall": {str(d): v for d, v in res["average"].items()},
                            "heldout_expert_recall": per_expert})
    path = Path(out) if out else Path(m.path) / PREDICTOR_FILE
    final.save(path)
    res["fit_s"] = time.perf_counter() - t1
    res["path"] = str(path)
    return res
