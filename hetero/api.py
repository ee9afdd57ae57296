"""load_offloaded(): resolve a model, plan its placement, and return a model object with a familiar API."""

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch

from .checkpoint.catalogue import Catalogue
from .config import ModelArgs
from .errors import HeteroError
from .experts.build import build_manager
from .experts.recording import calibrated_recall, recorded_trace
from .experts.replay import replay_window
from .flash import pack as packs
from .generate import SamplingParams, generate_ids, stream_generate
from .kvstore import factory as kvstore
from .models import family_for
from .placement.describe import checkpoint_tensors, compute_dtype, describe
from .placement.greedy import cache_tiers, expert_cache_slots, greedy_plan
from .placement.groups import make_groups
from .placement.plan import Plan, plan_table, validate
from .runtime.device import detect
from .runtime.executor import Executor
from .runtime.memory import Accountant
from .runtime.weights import WeightStore
from .sizes import parse_size
from . import store

log = logging.getLogger("hetero")
DEFAULT_CONTEXT = 4096
AUTO_RAM_SHARE = 0.8  # of available RAM when no --ram is given: leave room for the OS and the page cache


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]


def _dtype(dtype, cat: Catalogue) -> torch.dtype:
    return compute_dtype(dtype, Counter(t.dtype for t in cat.tensors.values() if t.dtype.is_floating_point))


def _open(path_or_name, disk_dir, dtype, say):
    """Resolve a model and read what loading and packing both need: (path, args, family, catalogue,
    dtype, groups)."""
    path = store.resolve(path_or_name, log=say)
    if disk_dir is not None and not Path(disk_dir).is_dir():
        raise HeteroError(f"--disk-dir {disk_dir}: not a directory")
    args = ModelArgs.from_dir(path)
    fam = family_for(args)
    cat = Catalogue(path)
    cdtype = _dtype(dtype, cat)
    groups = make_groups(checkpoint_tensors(args, cat), getattr(fam, "EXPERT_PATTERN", None), cdtype)
    return path, args, fam, cat, cdtype, groups


class OffloadedModel:
    """A causal LM whose weights live across gpu / cpu / disk per its Plan.

    Use it like a transformers model: `model(input_ids).logits`, `model.generate(...)`, plus
    `model.stream(...)` for text, `model.plan` and `model.stats()`.
    """

    def __init__(self, path: Path, args, tokenizer, plan, groups, executor, accountant, device, dtype, notes,
                 context_tokens: int | None = None):
        self.path, self.config, self.tokenizer, self.plan = path, args, tokenizer, plan
        self.groups, self.executor, self.accountant = groups, executor, accountant
        self.device, self.dtype, self.notes = device, dtype, notes
        self.generation_config = _generation_defaults(path)
        # the longest sequence, prompt and answer together, a KV cache of this model holds: the plan's
        # kv_tokens for the contiguous cache; a paged or retrieval cache spills to RAM and disk, so there
        # it is the model's limit (or `context`), however little of it the compute tier keeps
        self.context_tokens = context_tokens or plan.kv_tokens

    def __call__(self, input_ids, attention_mask=None, **_ignored) -> CausalLMOutput:
        """Logits for every position of `input_ids` [B, T] (no cache is kept between calls)."""
        input_ids = _check_ids(input_ids, self.config.vocab_size)
        _check_mask(attention_mask)
        cache = self.executor.new_cache()
        try:
            return CausalLMOutput(self.executor.forward(input_ids, cache))
        finally:
            cache.free()

    forward = __call__

    def generate(self, input_ids, max_new_tokens: int | None = None, min_new_tokens: int = 0, do_sample: bool | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id=None, seed: int | None = None,
                 attention_mask=None, **_ignored) -> torch.Tensor:
        """Generate as transformers does: returns [B, T + N] ids (prompt included).

        Unset sampling arguments take the model's generation_config.json values, like transformers.
        """
        input_ids = _check_ids(input_ids, self.config.vocab_size)
        _check_mask(attention_mask)
        g = self.generation_config
        do_sample = g.get("do_sample", False) if do_sample is None else do_sample
        eos = eos_token_id if eos_token_id is not None else g.get("eos_token_id", self.config.eos_token_id)
        eos = set(eos if isinstance(eos, (list, tuple, set)) else [] if eos is None else [eos])
        params = SamplingParams(
            max_new_tokens=max_new_tokens if max_new_tokens is not None else g.get("max_new_tokens", 20),
            min_new_tokens=min_new_tokens,
            temperature=(temperature if temperature is not None else g.get("temperature", 1.0)) if do_sample else 0.0,
            top_k=(top_k if top_k is not None else g.get("top_k", 50)) if do_sample else 0,
            top_p=(top_p if top_p is not None else g.get("top_p", 1.0)) if do_sample else 1.0,
            repetition_penalty=repetition_penalty, seed=seed, eos_token_ids=frozenset(eos),
        )
        return generate_ids(self.executor, input_ids, params, pad_token_id)

    def stream(self, prompt_or_messages, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None, stop=(), stats: dict | None = None):
        """Yield the answer's text piece by piece.

        Args:
            prompt_or_messages: a string (sent through the chat template when the model has one) or a
                list of {"role", "content"} messages.
        """
        ids = self.encode_prompt(prompt_or_messages)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop),
                                eos_token_ids=frozenset(self.tokenizer.eos_token_ids))
        for piece in stream_generate(self.executor, self.tokenizer, ids, params, stats=stats):
            if piece.text:
                yield piece.text

    def encode_prompt(self, prompt_or_messages) -> list[int]:
        if self.tokenizer is None:
            raise HeteroError(f"{self.path}: no tokenizer.json, so text prompts cannot be encoded; pass token ids")
        if isinstance(prompt_or_messages, str):
            if not self.tokenizer.has_chat_template:
                return self.tokenizer.encode(prompt_or_messages)
            prompt_or_messages = [{"role": "user", "content": prompt_or_messages}]
        return self.tokenizer.apply_chat_template(list(prompt_or_messages), add_generation_prompt=True, tokenize=True)

    def stats(self) -> dict:
        """Measured figures: tokens/s, bytes moved per token by phase, memory held per tier."""
        t = self.executor.timing
        out = {}
        for phase in ("prefill", "decode"):
            n, s = t[f"{phase}_tokens"], t[f"{phase}_s"]
            out.update({
                f"{phase}_tokens": n, f"{phase}_s": s,
                f"{phase}_tokens_per_s": n / s if s else None,
                f"{phase}_disk_read_bytes_per_token": t[f"{phase}_disk_read_bytes"] / n if n else None,
                f"{phase}_host_to_device_bytes_per_token": t[f"{phase}_host_to_device_bytes"] / n if n else None,
            })
            busy, stall = t[f"{phase}_io_busy_s"], t[f"{phase}_io_stall_s"]
            out.update({  # the disk pipeline: achieved read bandwidth, time the compute waited, share hidden
                f"{phase}_disk_read_gbps": t[f"{phase}_disk_read_bytes"] / busy / 1e9 if busy else None,
                f"{phase}_io_stall_s_per_token": stall / n if n else None,
                f"{phase}_io_hidden_fraction": max(0.0, 1 - stall / busy) if busy else None,
            })
        out["decode_s_per_token"] = t["decode_s"] / t["decode_tokens"] if t["decode_tokens"] else None
        out["predicted_decode_s_per_token"] = _predicted_decode(self)
        w = self.executor.store
        out["io"] = {"prefetch_depth": self.plan.depth, "pack": str(w.pack.path) if w.pack else None,
                     "pack_dtype": w.pack.format.tag if w.pack else None,
                     "reader": w.reader.kind if w.reader else None, "direct_io": bool(w.reader and w.direct)}
        experts = self.executor.experts
        out["experts"] = experts.report() if experts is not None else None
        out["resident_bytes"] = self.executor.store.resident_bytes()
        out["memory"] = self.accountant.snapshot()
        out["device"] = self.device.name()
        out["notes"] = list(self.notes)
        return out

    def reset_stats(self):
        for k in self.executor.timing:
            self.executor.timing[k] = 0
        if self.executor.experts is not None:
            self.executor.experts.stats.reset()

    def plan_rows(self):
        return plan_table(self.plan, self.groups)


def _predicted_decode(m) -> float | None:
    """The cost model's decode seconds per token for this plan and the tokens run so far (None without a profile)."""
    from .placement.cost import predict

    t = m.executor.timing
    key = (t["prefill_tokens"], t["decode_tokens"])
    cached = getattr(m, "_prediction", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    profile = getattr(m, "profile", None)
    if profile is None:
        return None
    desc = getattr(m, "_desc", None)
    if desc is None:
        cat = Catalogue(m.path)
        try:
            desc = m._desc = describe(m.config, checkpoint_tensors(m.config, cat), m.dtype)
        finally:
            cat.close()
    pack = m.executor.store.pack  # the bytes read and decoded are the pack's, as it was written
    workload = _routing_workload(m.device, getattr(m, "routing", {}), prompt_tokens=max(1, t["prefill_tokens"]),
                                 new_tokens=max(1, t["decode_tokens"]),
                                 extents=packs.staging_extents(pack.extents, m.dtype) if pack else None)
    s = predict(desc, m.plan, profile, workload).decode_s_per_token
    m._prediction = (key, s)
    return s


def _profile_for(planner: str, profile, plan, say):
    """The hardware profile to plan and predict with: the one given (object or JSON path), else this machine's
    (measured once, quickly, when the cost planner needs one and none is cached), else None."""
    from .placement import hardware

    if planner not in ("cost", "greedy"):
        raise HeteroError(f"planner {planner!r}: choose cost or greedy")
    if profile is not None:
        return profile if isinstance(profile, hardware.Profile) else hardware.Profile.load(profile)
    if planner == "cost" and plan is None:
        return hardware.ensure_profile(say)
    return hardware.cached()


def _routing_workload(device, routing: dict, **kw):
    """The cost model's Workload for this device and what is known of the routing (_routing_facts)."""
    from .placement.cost import Workload

    return Workload(gpu="fake-gpu" if device.kind == "fake-gpu" else None, **routing, **kw)


def _routing_facts(path, cat, model, prefetch: bool, policy: str, notes: list) -> dict:
    """Workload fields from the routing trace and calibrated predictor next to an MoE model ({} for dense)."""
    if not model.moe_blocks():
        return {}
    trace = recorded_trace(path, cat, model, notes)
    # the frequencies are the whole trace's; the cache replays only need its middle (kept: stats() predicts)
    return {"expert_freq": trace.frequencies() if trace is not None else None,
            "routing_trace": replay_window(trace) if trace is not None else None,
            "expert_policy": policy, "expert_recall": calibrated_recall(path, cat, model) if prefetch else 0.0}


def _plan_function(planner: str, profile, args, cat, dtype, device, routing: dict | None = None):
    """A function with greedy_plan's signature that plans by `planner`: "cost" (the cost model) or "greedy".

    routing: Workload fields from a routing trace and the predictor (_routing_facts); {} = uniform prior.
    """
    if planner == "greedy":
        return greedy_plan
    from .placement.planner import plan_model

    desc = describe(args, checkpoint_tensors(args, cat), dtype)
    workload = _routing_workload(device, routing or {})

    def plan_fn(groups, args, dtype, budgets, compute, context, fixed_context=False, **staging):
        return plan_model(desc, budgets, compute, context, profile, workload, fixed_context, **staging)
    return plan_fn


def _generation_defaults(path: Path) -> dict:
    import json

    f = Path(path) / "generation_config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _check_ids(input_ids, vocab: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise HeteroError(f"input_ids must be an integer tensor [batch, tokens], got {tuple(input_ids.shape)} {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise HeteroError(f"input_ids hold a token id outside the vocabulary [0, {vocab})")
    return input_ids.long().cpu()


def _check_mask(mask):
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise HeteroError("padded batches (attention_mask with zeros) are not supported yet; run sequences one at a time")


def _ensure_pack(path: Path, cat, tensors, groups, fmt, disk_dir, acc, say, progress):
    """The pack of the checkpoint in `fmt`, written now (once) if there is none or it is stale."""
    roots = packs.pack_roots(disk_dir)
    for root in roots:
        dest = packs.pack_path(path, fmt, root)
        found = packs.open_pack(dest, cat)
        if found is not None:
            return found
    for root in roots:
        dest = packs.pack_path(path, fmt, root)
        say(f"packing {path.name} as {fmt.tag} into {dest} (the plan puts weights on disk; done once) ...")

        def reserve(n):
            (acc.reserve if n > 0 else acc.release)("cpu", abs(n), "staging")
        try:
            packs.write_pack(cat, tensors, groups, dest, fmt, progress=progress, reserve=reserve)
            return packs.Pack(dest)
        except PermissionError:
            continue
        except OSError as e:
            raise HeteroError(f"{dest}: cannot write the pack ({e.strerror})") from None
    raise HeteroError(f"{path}: no writable place for the pack; pass disk_dir (--disk-dir)")


def pack_model(path_or_name, dtype=None, group_size=None, disk_dir=None, log_fn=None, progress=None) -> Path:
    """Write (or rewrite) the pack of a model: `hetero pack`.

    Args:
        path_or_name: as for load_offloaded.
        dtype: pack dtype (bf16, fp16, float32, int8, int4); default the checkpoint's own (lossless).
        group_size: int8/int4 columns per scale (default 64).
        disk_dir: where to write it; default inside the model's directory.
    Returns:
        The pack directory.
    """
    say = log_fn or log.info
    path, args, fam, cat, ckpt, groups = _open(path_or_name, disk_dir, None, say)
    fmt = packs.PackFormat.parse(dtype or ckpt, group_size)
    dest = packs.pack_path(path, fmt, disk_dir)
    say(f"packing {path.name} as {fmt.tag} into {dest} ...")
    try:
        return packs.write_pack(cat, checkpoint_tensors(args, cat), groups, dest, fmt, progress=progress)
    except OSError as e:
        raise HeteroError(f"{dest}: cannot write the pack ({e.strerror})") from None


def load_offloaded(path_or_name, vram=None, ram=None, disk_dir=None, dtype=None, device=None, plan=None,
                   context: int | None = None, log_fn=None, planner: str = "cost",
                   profile=None, pack=None, progress=None, attention: str = "exact",
                   kv_budget=None, expert_cache=None, prefetch: bool = True,
                   expert_policy: str = "score") -> OffloadedModel:
    """Load a model with its weights placed across gpu, cpu and disk within the given budgets.

    Args:
        path_or_name: an HF directory, a .gguf file, a model-store name or a catalogue name ("smollm2").
        vram: accelerator budget ("8GB", "512MiB", bytes); unused without an accelerator.
        ram: host-memory budget; default 80% of the RAM available now.
        disk_dir: the directory for the pack that disk-tier weights are read from (default: inside the
            model's directory, or the store when that is read-only). Packed once, reused after.
        dtype: compute dtype ("float32", "bfloat16", "float16"); default the checkpoint's.
        device: "cpu", "cuda" or "fake-gpu" (host memory standing in for a gpu); default: detected.
        plan: a Plan, or the path of a plan JSON, to use instead of planning.
        context: tokens of KV cache to reserve; default min(4096, the model's limit), shrunk to fit.
        planner: "cost" (place by predicted time with the machine's hardware profile, measured once per
            machine and cached) or "greedy" (fill the compute tier, then RAM, in execution order).
        profile: a hardware.Profile or a profile JSON path to plan with (default: this machine's).
            With a paged cache (attention="retrieval" or a kv_budget): the longest context accepted
            (default: the model's limit).
        pack: what disk-tier weights are read as: a pack dtype ("bf16", "bf16z", "fp16", "float32",
            "int8", "int4", "int8-g32" for a group size) or a pack directory. Default: lossless, the
            compute dtype, or for a bfloat16 checkpoint bf16z (the same values in a quarter fewer
            bytes) when the cost planner predicts it faster (placement/packing.py).
        progress: callback(done, total) for the progress of packing, or None.
        attention: "exact" (default) or "retrieval" (KV blocks off the compute device reached through a
            per-head ANN index of their keys; hetero/kvstore/retrieval.py).
        kv_budget: KV bytes kept on the compute device ("64MB"); past it, KV blocks go to RAM and disk.
            Default with retrieval: the plan's reservation for a min(4096, limit)-token cache.
        expert_cache: MoE models: the expert caches' size — a size per cache ("2GB"), a number of slots
            per cache, or {tier: slots}; 0 for none. Default: when experts do not all fit on the compute
            tier, slots for the experts of the next few layers plus a share of the free budget
            (placement.greedy.default_expert_cache), taken from the budgets before placing.
        prefetch: MoE models: predict the experts of the next layers (experts/predictor.py) and load
            them ahead into the caches; False loads experts on demand only (the baseline). Outputs
            are identical either way.
        expert_policy: the caches' replacement policy: "score" (decayed frequency x routing
            weight, protecting predicted experts) or "lru".
    Returns:
        An OffloadedModel.
    """
    say = log_fn or log.info
    notes = []
    vram_b, ram_b = parse_size(vram, "vram"), parse_size(ram, "ram")
    path, args, fam, cat, cdtype, groups = _open(path_or_name, disk_dir, dtype, say)
    dev = detect(device)
    if not dev.has_gpu and vram_b is not None:
        notes.append("no accelerator: computing on the CPU, --vram is unused")
    if dev.has_gpu and vram_b is None:
        vram_b = dev.gpu_memory_bytes()
    if ram_b is None:
        ram_b = int(psutil.virtual_memory().available * AUTO_RAM_SHARE)
    budgets = {"gpu": vram_b if dev.has_gpu else None, "cpu": ram_b}
    max_ctx = args.max_position_embeddings
    if context is not None and not 0 < context <= max_ctx:
        raise HeteroError(f"context {context}: this model supports 1 to {max_ctx} tokens")
    kvstore.check_attention(attention)
    kv_budget = parse_size(kv_budget, "kv_budget")
    paged = kvstore.paged(attention, kv_budget)
    if paged:  # `context` bounds the sequence; the plan reserves only what the compute tier keeps
        max_tokens, context = context or max_ctx, kvstore.tokens_for(kv_budget, args, cdtype) if kv_budget else None
    tensors = checkpoint_tensors(args, cat)
    opened = packs.Pack(pack) if pack is not None and Path(str(pack)).is_dir() else None
    if opened is not None and opened.fingerprint != packs.fingerprint(cat):
        raise HeteroError(f"{pack}: this pack was made from another checkpoint (or an older copy of {path}); "
                          f"pack again with `hetero pack {path}`")
    fmt = opened.format if opened else packs.PackFormat.parse(pack or cdtype)
    extents = (packs.staging_extents(opened.extents, cdtype) if opened else
               packs.planned_extents(tensors, groups, fmt, cdtype))
    if expert_policy not in ("score", "lru"):
        raise HeteroError(f"expert_policy {expert_policy!r}: choose score or lru")
    model = fam.build(args)  # meta weights: module names and shapes, nothing read yet
    facts = _routing_facts(path, cat, model, prefetch, expert_policy, notes)
    freq = facts.get("expert_freq")
    routing = dict(extents=extents, expert_cache=expert_cache, expert_freq=freq)
    if plan is None:
        # a budget below the minimum is refused before any seconds go into measuring the machine
        greedy_plan(groups, args, cdtype, budgets, dev.compute_tier, context or min(DEFAULT_CONTEXT, max_ctx),
                    fixed_context=context is not None, **routing)
    # measured quietly: a log line here would stand before a checkpoint error found later in loading
    profile = _profile_for(planner, profile, plan, lambda *_: None)
    if plan is None:
        plan_fn = _plan_function(planner, profile, args, cat, cdtype, dev, facts)

        def plan_for(ext):
            return plan_fn(groups, args, cdtype, budgets, dev.compute_tier, context or min(DEFAULT_CONTEXT, max_ctx),
                           fixed_context=context is not None, **{**routing, "extents": ext}), None
        if planner == "cost" and pack is None:  # no pack named: the lossless format predicted fastest
            from .placement.packing import lossless_formats, pick_format

            desc = describe(args, tensors, cdtype)
            fmt, extents, plan, _ = pick_format(desc, lossless_formats(desc, path, disk_dir), profile,
                                                _routing_workload(dev, facts), plan_for)
            routing["extents"] = extents
        else:
            plan, _ = plan_for(extents)
        if context is None and not paged and plan.kv_tokens < min(DEFAULT_CONTEXT, max_ctx):
            notes.append(f"context limited to {plan.kv_tokens} tokens by the memory budget")
        source, planned = "plan", True
    else:
        source, planned = (str(plan) if not isinstance(plan, Plan) else "plan"), False
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        if plan.kv_tokens > max_ctx:
            raise HeteroError(f"{source}: kv_tokens {plan.kv_tokens} exceeds the model's {max_ctx}-token limit")
        if expert_cache is not None:
            plan = replace(plan, expert_cache=expert_cache_slots(expert_cache, groups, args, plan.compute, {}, extents))

    def trimmed(plan):
        used = cache_tiers(groups, plan.tiers, plan.compute)  # a cache no expert of this placement would pass through
        return replace(plan, expert_cache={t: n for t, n in plan.expert_cache.items() if t in used and n})

    plan = trimmed(plan)
    if planned or opened is not None or not fmt.codec:  # refused before a pack is written
        validate(plan, groups, args, cdtype, dev.has_gpu, source, extents)
    if "disk" in plan.tiers.values() and opened is None:
        opened = _ensure_pack(path, cat, tensors, groups, fmt, disk_dir, Accountant(plan.budgets), say, progress)
        written = packs.staging_extents(opened.extents, cdtype)
        if written != extents:  # a compressed pack's exact sizes are known once it is written
            extents = routing["extents"] = written
            if planned:
                try:
                    validate(plan, groups, args, cdtype, dev.has_gpu, source, extents)
                except HeteroError:  # its weights escaped the codec more than layout() guessed
                    plan = trimmed(plan_for(extents)[0])
    validate(plan, groups, args, cdtype, dev.has_gpu, source, extents)
    acc = Accountant(plan.budgets)
    weights = WeightStore(model, fam, cat, groups, plan, dev, acc, cdtype, pack=opened)
    kv = kvstore.kv_cache_factory(attention, plan, groups, args, cdtype, dev, acc, max_tokens, disk_dir,
                                  extents) if paged else None
    experts = build_manager(path, args, cat, model, weights, groups, extents, profile, dev, prefetch, expert_policy,
                            notes, facts) if model.moe_blocks() else None
    executor = Executor(model, weights, plan, dev, acc, kv_cache=kv, experts=experts)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    say(f"loaded {path.name}: {args.model_type}, {args.num_hidden_layers} layers, {cdtype}, compute on {dev.name()}")
    for n in notes:
        say(n)
    m = OffloadedModel(path, args, tokenizer, plan, groups, executor, acc, dev, cdtype, notes,
                       max_tokens if paged else None)
    m.profile = profile  # for predicted_decode_s_per_token in stats()
    m.routing = facts
    return m
