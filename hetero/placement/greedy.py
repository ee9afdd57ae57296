"""A greedy plan from the budgets: fill the compute tier, then RAM, then disk, in execution order.

This is the simple baseline the cost-model planner is measured against; it is a pure function.
"""

from ..errors import HeteroError
from ..sizes import format_size
from .groups import Group, kv_bytes_per_token
from .plan import MAX_LOOKAHEAD, Plan, expert_slot_bytes, predictor_bytes, staging_bytes

MIN_CONTEXT = 256  # below this a chat is not useful; say so instead of planning it
# Prefetch depth without a cost model: enough layers in flight to keep this many bytes of reads
# queued (a deep enough queue for an NVMe SSD), at most MAX_DEPTH, and never more extra staging than
# DEPTH_BUDGET_SHARE of the RAM budget — a byte kept resident saves a read every token, a byte of
# read-ahead only hides one.
READAHEAD_BYTES = 64 * 2**20
MAX_DEPTH = 4
DEPTH_BUDGET_SHARE = 0.125
# Expert caches by default, when an MoE model does not fit on a tier: slots for the experts of the
# layer computing and of MAX_LOOKAHEAD layers predicted ahead (top_k each), and then
#  - when a routing trace placed the homes by frequency: EXPERT_CACHE_SHARE of the tier's free budget,
#    never more than EXPERT_CACHE_MAX_SHARE of it;
#  - when homes could only be placed on a uniform prior: all the free budget the dense groups (read by
#    every token) leave, up to EXPERT_CACHE_UNIFORM_SHARE of it. A byte of cache serves whichever
#    experts the routing wants now, a byte of resident expert only the one placed there. On the widened
#    MoE fixture (benchmarks/moe_offload.py --only hetero, 654 MiB of RAM) the disk read 0.411 GB/token
#    with half the budget as cache (62 slots), 0.336 with 111 (half the dense groups then on disk),
#    0.367 with 120 (more of them on disk), 0.309 with the dense groups all in RAM and 103 slots.
EXPERT_CACHE_SHARE = 0.1
EXPERT_CACHE_MAX_SHARE = 0.5
EXPERT_CACHE_UNIFORM_SHARE = 0.9


def size_depth(groups: list[Group]) -> int:
    """The prefetch depth derived from layer sizes alone (used when no cost model gives one)."""
    per_layer: dict[int, int] = {}
    for g in groups:
        if g.kind in ("attn", "mlp"):
            per_layer[g.layer] = per_layer.get(g.layer, 0) + g.nbytes
    if not per_layer:
        return 1
    mean = sum(per_layer.values()) / len(per_layer)
    return max(1, min(MAX_DEPTH, -(-READAHEAD_BYTES // max(1, int(mean)))))


def minimum_bytes(groups: list[Group], args, dtype, compute: str, kv_tokens: int, depth: int = 1,
                  extents: dict | None = None) -> dict[str, int]:
    """The least each tier must hold to run at all: norms, worst-case staging (prefetch depth
    `depth`, pack extents `extents`, see plan.staging_bytes) and the KV cache."""
    worst = {g.name: (compute if g.kind == "norms" else "disk") for g in groups}
    need = staging_bytes(groups, worst, compute, depth, extents)
    need[compute] = need.get(compute, 0) + sum(g.nbytes for g in groups if g.kind == "norms")
    need[compute] += kv_tokens * kv_bytes_per_token(args, dtype)
    return need


def cache_tiers(groups: list[Group], tiers: dict, compute: str) -> set[str]:
    """The tiers whose expert cache a placement uses: gpu when experts live off the gpu (computing
    there), cpu when experts live on disk."""
    homes = {tiers[g.name] for g in groups if g.kind == "expert"}
    out = {"cpu"} if "disk" in homes else set()
    if compute == "gpu" and homes - {"gpu"}:
        out.add("gpu")
    return out


def default_expert_cache(groups: list[Group], args, compute: str, free: dict, extents: dict | None = None,
                         routing_known: bool = False) -> dict:
    """Expert-cache slots per tier for an MoE model that does not fit on a tier, taken from `free` (bytes
    left per tier before any home is placed; None: unlimited). Without measured routing (a trace) the
    homes are placed on a uniform prior, so the cache, which follows the routing, gets the larger share."""
    experts = [g for g in groups if g.kind == "expert"]
    if not experts:
        return {}
    total = sum(g.nbytes for g in groups if g.kind != "norms")
    slot = expert_slot_bytes(groups, extents)
    base = (args.num_experts_per_tok or 1) * (1 + MAX_LOOKAHEAD)
    # what the dense groups would hold: an untied embedding is gathered row by row, left to the disk first
    dense = sum(g.nbytes for g in groups
                if g.kind not in ("expert", "norms") and (args.tie_word_embeddings or g.kind != "embed"))
    out = {}
    gpu_free = free.get("gpu") if compute == "gpu" else 0
    spills = {"gpu": compute == "gpu" and gpu_free is not None and gpu_free < total,
              "cpu": free.get("cpu") is not None and gpu_free is not None and free["cpu"] + gpu_free < total}
    for t in ("gpu", "cpu"):
        if not spills[t]:
            continue
        room = free[t] - (predictor_bytes(groups, args) if t == "cpu" else 0)
        held = min(dense, max(0, room))  # the dense bytes this tier would hold (the gpu's first)
        dense -= held
        if routing_known:
            want = min(base + int(EXPERT_CACHE_SHARE * room / slot[t]), int(EXPERT_CACHE_MAX_SHARE * room / slot[t]))
        else:
            want = min(max(base, int((room - held) / slot[t])), int(EXPERT_CACHE_UNIFORM_SHARE * room / slot[t]))
        n = min(len(experts), want)
        if n > 0:
            out[t] = n
    return out


def expert_cache_slots(spec, groups: list[Group], args, compute: str, free: dict, extents: dict | None = None,
                       routing_known: bool = False) -> dict:
    """Slots per tier from what the user asked for.

    Args:
        spec: None (default_expert_cache), a number of slots for each tier's cache, a size in bytes
            per tier's cache (a str such as "512MB", parsed by sizes.parse_size), or a dict tier -> slots.
    """
    if spec is None:
        return default_expert_cache(groups, args, compute, free, extents, routing_known)
    if isinstance(spec, dict):
        return {t: int(n) for t, n in spec.items() if n}
    if not any(g.kind == "expert" for g in groups):
        return {}
    tiers = ("gpu", "cpu") if compute == "gpu" else ("cpu",)
    if isinstance(spec, str):
        from ..sizes import parse_size

        nbytes = parse_size(spec, "expert_cache")
        slot = expert_slot_bytes(groups, extents)
        return {t: nbytes // slot[t] for t in tiers if nbytes // slot[t]}
    return {t: int(spec) for t in tiers if int(spec)}


def greedy_plan(
    groups: list[Group], args, dtype, budgets: dict, compute: str, context: int, fixed_context: bool = False,
    depth: int | None = None, extents: dict | None = None, expert_cache=None, expert_freq=None,
) -> Plan:
    """Place groups greedily within the budgets.

    Args:
        groups: the model's groups in execution order.
        budgets: {"gpu": bytes | None, "cpu": bytes | None}; None means unlimited.
        compute: "gpu" or "cpu".
        context: tokens of KV cache to reserve.
        fixed_context: if False, the context may shrink (to MIN_CONTEXT at least) to fit the budget.
        depth: prefetch depth; default size_depth(groups), lowered to fit the budget.
        extents: the pack's extent sizes (plan.staging_bytes); default a pack in the compute dtype.
        expert_cache: expert-cache slots (see expert_cache_slots): taken from the budgets before any
            home is placed, and dropped afterwards from a tier whose cache the placement does not use.
        expert_freq: measured activation frequencies (a routing trace's; cost.Workload.expert_freq):
            the experts are then placed most used first, else in execution order, and the default
            cache can be smaller (default_expert_cache).
    Returns:
        A Plan that fits the budgets.
    Raises:
        HeteroError: the budget is below the minimum working set, naming that minimum.
    """
    budgets = {"gpu": budgets.get("gpu") if compute == "gpu" else None, "cpu": budgets.get("cpu"), "disk": None}
    ctx = context
    while True:  # the context first (at depth 1): a usable context matters more than read-ahead
        need = minimum_bytes(groups, args, dtype, compute, ctx, 1, extents)
        short = {t: n for t, n in need.items() if budgets.get(t) is not None and n > budgets[t]}
        if not short or fixed_context or ctx <= MIN_CONTEXT:
            break
        ctx = max(MIN_CONTEXT, ctx // 2)
    if short:
        tier, n = next(iter(short.items()))
        flag = "--vram" if tier == "gpu" else "--ram"
        raise HeteroError(
            f"{flag} {format_size(budgets[tier])} is below this model's minimum working set on the {tier} tier: "
            f"{format_size(n)} (with a {ctx}-token KV cache); raise {flag} to at least {format_size(n)}"
        )
    one, depth = need, depth or size_depth(groups)
    while depth > 1:
        need = minimum_bytes(groups, args, dtype, compute, ctx, depth, extents)
        if all(budgets.get(t) is None or (need[t] <= budgets[t] and need[t] - one[t] <= DEPTH_BUDGET_SHARE * budgets[t])
               for t in need):
            break
        depth -= 1
    need = minimum_bytes(groups, args, dtype, compute, ctx, depth, extents)
    free = {t: (None if budgets[t] is None else budgets[t] - need.get(t, 0)) for t in budgets}
    cache = expert_cache_slots(expert_cache, groups, args, compute, free, extents, expert_freq is not None)
    if any(cache.values()):
        slot = expert_slot_bytes(groups, extents)
        for t, n in cache.items():
            if free[t] is not None:
                free[t] -= n * slot[t]
        if free["cpu"] is not None:
            free["cpu"] -= predictor_bytes(groups, args)  # the routing predictor's host copy
        short = [t for t in cache if free[t] is not None and free[t] < 0]
        if short:
            t = short[0]
            raise HeteroError(f"an expert cache of {cache[t]} slots ({format_size(cache[t] * slot[t])}) does not fit "
                              f"in the {t} budget beside the minimum working set; ask for a smaller one")
    order = ["gpu", "cpu"] if compute == "gpu" else ["cpu"]
    # in execution order, but what every token reads before the experts, which each token reads a few
    # of (and which the expert cache serves), and an untied embedding, only gathered row by row, last
    tied = args.tie_word_embeddings
    ranked = [g for g in groups if g.kind not in ("norms", "expert") and (tied or g.kind != "embed")]
    experts = [g for g in groups if g.kind == "expert"]
    if expert_freq is not None:
        from .cost import group_expert_probs

        p = group_expert_probs(groups, args, expert_freq)
        experts.sort(key=lambda g: -p[(g.layer, g.expert)])  # stable: ties stay in execution order
    ranked += experts
    ranked += [g for g in groups if g.kind == "embed" and not tied]
    tiers = {g.name: compute for g in groups if g.kind == "norms"}
    for g in ranked:
        for t in order:
            if free[t] is None or free[t] >= g.nbytes:
                tiers[g.name] = t
                if free[t] is not None:
                    free[t] -= g.nbytes
                break
        else:
            tiers[g.name] = "disk"
    tiers = {g.name: tiers[g.name] for g in groups}
    used = cache_tiers(groups, tiers, compute)
    return Plan(tiers=tiers, compute=compute, budgets={k: v for k, v in budgets.items() if k != "disk"}, kv_tokens=ctx,
                depth=depth, expert_cache={t: n for t, n in cache.items() if t in used})
