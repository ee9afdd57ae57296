"""`hetero plan`: plan a model from its config and headers alone, and say what fits and how fast it will run."""

from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..experts.replay import replay_window
from ..flash.pack import PackFormat
from ..sizes import format_size
from .cost import Speeds, Workload, predict, tables
from .describe import ModelDesc
from .greedy import MIN_CONTEXT, greedy_plan, minimum_bytes
from .groups import kv_bytes_per_token
from .packing import lossless_formats, pick_format
from .plan import TIERS, Plan, tier_usage
from .planner import plan_model


def make_plan(desc: ModelDesc, budgets: dict, compute: str, context: int, fixed_context: bool, profile,
              workload: Workload, planner: str = "cost", prefill_weight: float = 0.0, **staging):
    """(plan, prediction) for `desc` within `budgets` by the named planner ("cost" or "greedy").

    staging: passed on to greedy_plan (e.g. expert_freq when experts are placed by a trace)."""
    tabs = tables(desc, profile, workload, compute)
    if planner == "greedy":
        plan = greedy_plan(list(desc.groups), desc.args, desc.dtype, budgets, compute, context, fixed_context, **staging)
    else:
        plan = plan_model(desc, budgets, compute, context, profile, workload, fixed_context, prefill_weight, tabs=tabs,
                          **staging)
    return plan, predict(desc, plan, profile, workload, tabs)


def layer_rows(desc: ModelDesc, plan: Plan, prediction) -> list[dict]:
    """One row per decoder layer: tiers of attention and dense MLP, experts per tier, KV bytes, bottleneck."""
    kv = plan.kv_tokens * kv_bytes_per_token(desc.args, desc.dtype) // desc.args.num_hidden_layers
    rows = {l: {"layer": l, "attn": None, "mlp": None, "experts": Counter(), "bytes": 0, "kv_bytes": kv,
                "kv_tier": plan.compute} for l in range(desc.args.num_hidden_layers)}
    for g in desc.groups:
        if g.layer is None:
            continue
        r = rows[g.layer]
        r["bytes"] += g.nbytes
        if g.kind == "expert":
            r["experts"][plan.tiers[g.name]] += 1
        else:
            r[g.kind] = plan.tiers[g.name]
    for l, streams, bottleneck in prediction.layers:
        rows[l]["decode_s"] = streams["loop"]
        rows[l]["bottleneck"] = bottleneck
    return [{**r, "experts": {t: r["experts"][t] for t in TIERS if r["experts"][t]}} for r in rows.values()]


def _placement(r: dict) -> str:
    parts = [f"attn:{r['attn']}"]
    if r["mlp"]:
        parts.append(f"mlp:{r['mlp']}")
    if r["experts"]:
        parts.append("experts:" + "/".join(f"{n} {t}" for t, n in r["experts"].items()))
    return " ".join(parts)


def table_rows(desc: ModelDesc, plan: Plan, rows: list[dict]) -> list[tuple]:
    """(layers, placement, size, KV, bottleneck, ms/token) with runs of identical layers merged."""
    out = []
    for g in desc.groups:
        if g.layer is None and g.kind != "lm_head":
            out.append((g.name, plan.tiers[g.name], format_size(g.nbytes), "", "", ""))
    run = []

    def flush():
        if run:
            a, b = run[0]["layer"], run[-1]["layer"]
            r = run[0]
            name = f"layer {a}" if a == b else f"layers {a}-{b}"
            out.append((name, _placement(r), format_size(r["bytes"]), f"{format_size(r['kv_bytes'])} {r['kv_tier']}",
                        r.get("bottleneck", ""), f"{1e3 * r.get('decode_s', 0):.2f}" + (" each" if a != b else "")))
            run.clear()

    for r in rows:
        key = lambda x: (_placement(x), x["bytes"], x.get("bottleneck"), round(x.get("decode_s", 0), 6))  # noqa: E731
        if run and key(run[-1]) != key(r):
            flush()
        run.append(r)
    flush()
    for g in desc.groups:
        if g.kind == "lm_head":
            out.append((g.name, plan.tiers[g.name], format_size(g.nbytes), "", "", ""))
    return out


def report(desc: ModelDesc, plan: Plan, prediction, workload: Workload, compute_label: str) -> dict:
    """Everything `hetero plan --json` prints."""
    groups, args, dtype, ext = list(desc.groups), desc.args, desc.dtype, workload.extents
    use = tier_usage(groups, plan, args, dtype, ext)
    tiers = {}
    for t in TIERS:
        if t == "gpu" and plan.compute != "gpu":
            continue
        u = use[t]
        tiers[t] = {**{f"{k}_bytes": v for k, v in u.items()}, "total_bytes": sum(u.values()),
                    "budget_bytes": plan.budgets.get(t) if t != "disk" else None}
    minimum = {f"{t}_bytes": n for t, n in minimum_bytes(groups, args, dtype, plan.compute, MIN_CONTEXT, extents=ext).items()}
    at_ctx = {f"{t}_bytes": n for t, n in minimum_bytes(groups, args, dtype, plan.compute, plan.kv_tokens,
                                                        extents=ext).items()}
    p = prediction
    return {
        "model_type": args.model_type, "parameters": desc.parameters, "dtype": str(dtype).replace("torch.", ""),
        "source": desc.source, "model_bytes": desc.total_bytes, "compute": plan.compute, "compute_device": compute_label,
        "kv_tokens": plan.kv_tokens, "budgets": plan.budgets, "tiers": tiers,
        "weights_bytes": {t: use[t]["weights"] for t in TIERS},
        "predicted": {
            "prompt_tokens": workload.prompt_tokens, "new_tokens": workload.new_tokens,
            "prefill_s": p.prefill_s, "prefill_tokens_per_s": workload.prompt_tokens / p.prefill_s if p.prefill_s else None,
            "decode_s_per_token": p.decode_s_per_token, "decode_tokens_per_s": p.decode_tokens_per_s,
            "bottleneck": p.bottleneck, "decode_streams_s": p.streams, "decode_stall_s": p.stall_s,
        },
        "minimum": {"context": MIN_CONTEXT, **minimum, "at_kv_tokens": at_ctx},
        "layers": layer_rows(desc, plan, prediction),
    }


def _matching_trace(trace_file, desc: ModelDesc, label: str | None = None):
    """The RoutingTrace in `trace_file`; HeteroError (naming it as `label`, default "--trace FILE")
    unless its MoE layers, experts and top-k are desc's."""
    from ..errors import HeteroError
    from ..experts.trace import RoutingTrace

    label = label or f"--trace {trace_file}"
    trace = RoutingTrace.load(trace_file)
    layers = sorted({g.layer for g in desc.groups if g.kind == "expert"})
    if not layers:
        raise HeteroError(f"{label}: {desc.args.model_type} is a dense model; routing traces are for MoE models")
    E = 1 + max(g.expert for g in desc.groups if g.kind == "expert")
    mine = (layers, E, desc.args.num_experts_per_tok)
    theirs = (list(trace.layers), trace.num_experts, trace.top_k)
    if mine != theirs:
        raise HeteroError(f"{label}: recorded on MoE layers {_span(theirs[0])}, {theirs[1]} experts, top-{theirs[2]}; "
                          f"this model has layers {_span(layers)}, {E} experts, top-{mine[2]}")
    return trace


def _span(layers: list) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers else "none"


def plan_command(model, vram=None, ram=None, context=None, dtype=None, device=None, planner="cost",
                 prompt_tokens=128, new_tokens=128, profile_file=None, log=None, trace_file=None, pack=None):
    """What `hetero plan` computes: (report dict, plan, table rows). Reads config.json and headers only.

    Budgets default as when loading: the accelerator's memory, 80% of the RAM available now.
    trace_file: a routing trace (`hetero trace`) of this MoE model: experts are placed by its
    frequencies and the expert caches replayed on it, as loading does with a trace beside the model.
    Default: the trace `hetero trace` left beside the model, if there is one (a note says so).
    (Nothing ties it to these weights here — none are read — so only its shape is checked.)
    pack: the dtype of the pack disk-tier weights are read from, as `hetero run --pack` (bf16, bf16z,
    int8, int4, int8-g32, ...): the plan and prediction use its layout (the bytes read, and the decoding
    of quantized or compressed ones). Default, as loading: the lossless format predicted fastest
    (placement/packing.py; the compute dtype, or bf16z for a bfloat16 checkpoint).
    """
    import psutil

    from .. import store
    from ..errors import HeteroError
    from ..experts.recording import TRACE_FILE
    from ..sizes import parse_size
    from .describe import describe_dir
    from .hardware import Profile, ensure_profile

    vram_b, ram_b = parse_size(vram, "--vram"), parse_size(ram, "--ram")
    for flag, n in (("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens)):
        if n < 1:
            raise HeteroError(f"{flag} must be at least 1, not {n}")
    path = store.resolve(model, pull_missing=False, log=log or (lambda *_: None))
    desc = describe_dir(path, dtype)
    profile = Profile.load(profile_file) if profile_file else ensure_profile(log)
    kind = device or ("cuda" if "cuda" in profile.compute else "cpu")
    if kind not in ("cpu", "cuda", "fake-gpu"):
        raise HeteroError(f"device {kind!r} is not one of cpu, cuda, fake-gpu")
    if kind == "cuda" and "cuda" not in profile.compute:
        raise HeteroError("device 'cuda' asked for, but the hardware profile has no CUDA device")
    compute = "cpu" if kind == "cpu" else "gpu"
    notes = []
    if compute == "cpu" and vram_b is not None:
        notes.append("no accelerator: computing on the CPU, --vram is unused")
    if compute == "gpu" and vram_b is None and kind == "cuda":
        vram_b = profile.gpu_bytes
    if ram_b is None:
        ram_b = int(psutil.virtual_memory().available * 0.8)
    max_ctx = desc.args.max_position_embeddings
    if context is not None and not 0 < context <= max_ctx:
        raise HeteroError(f"--context {context}: this model supports 1 to {max_ctx} tokens")
    workload = Workload(prompt_tokens=prompt_tokens, new_tokens=new_tokens, gpu=None if kind != "fake-gpu" else "fake-gpu")
    trace = None
    if trace_file is not None:
        trace = _matching_trace(trace_file, desc)
        notes.append(f"experts placed by the routing trace {trace_file} ({trace.num_tokens} tokens)")
    elif (Path(path) / TRACE_FILE).is_file() and any(g.kind == "expert" for g in desc.groups):
        # what loading uses too (where it also checks the router weights; none are read here)
        try:
            trace = _matching_trace(Path(path) / TRACE_FILE, desc, f"{TRACE_FILE} next to the model")
            notes.append(f"experts placed by the routing trace next to the model ({trace.num_tokens} tokens; "
                         "--trace picks another)")
        except HeteroError as e:
            notes.append(f"{e}: experts are placed without it")
    if trace is not None:
        workload = replace(workload, expert_freq=trace.frequencies(), routing_trace=replay_window(trace))
    budgets = {"gpu": vram_b if compute == "gpu" else None, "cpu": ram_b}

    def plan_for(extents):  # the pack as loading would write it: its layout sets the bytes read
        return make_plan(desc, budgets, compute, context or min(4096, max_ctx), context is not None, profile,
                         replace(workload, extents=extents), planner, expert_freq=workload.expert_freq, extents=extents)
    # as loading does: the named pack, else the lossless format the cost model predicts faster
    formats = [PackFormat.parse(pack)] if pack else lossless_formats(desc, path)
    fmt, extents, plan, prediction = pick_format(desc, formats if planner == "cost" else formats[:1], profile,
                                                 workload, plan_for)
    workload = replace(workload, extents=extents)
    if context is None and plan.kv_tokens < min(4096, max_ctx):
        notes.append(f"context limited to {plan.kv_tokens} tokens by the memory budget")
    if trace is None and any(plan.expert_cache.values()):
        # the cost model cannot know how often real routing repeats itself: it errs slow (on the widened
        # MoE fixture of benchmarks/moe_offload.py, 0.32 s/token predicted, 0.21-0.24 measured)
        notes.append("no routing trace: the expert cache is predicted on the uniform prior, as if routing never "
                     "repeated, so decode usually runs faster than predicted; `hetero trace MODEL --text FILE` "
                     "measures the routing and sharpens both the placement and the prediction")
    label = Speeds(profile, compute, workload).label
    data = report(desc, plan, prediction, workload, label)
    data.update(model=str(path), planner=planner, notes=notes, profile="quick" if profile.quick else "full", pack=fmt.tag,
                pack_bytes=sum(x[0] for x in extents.values()))
    return data, plan, table_rows(desc, plan, data["layers"])
