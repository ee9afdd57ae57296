"""Building the expert runtime of a loaded MoE model (api.load_offloaded calls build_manager)."""

from ..errors import HeteroError
from ..placement.cost import Workload, predict
from ..placement.describe import checkpoint_tensors, describe
from ..placement.plan import expert_slot_bytes, predictor_bytes
from .decide import ExpertCosts
from .manager import ExpertManager
from .predictor import SpeculativeGating, load_predictor, read_routers


def build_manager(path, args, cat, model, weights, groups, extents, profile, dev, prefetch: bool, policy: str,
                  notes: list, routing: dict | None = None) -> ExpertManager:
    """The ExpertManager of an MoE model: its caches (the plan's slots), miss decisions and lookahead from
    the hardware profile (when there is one), and the routing predictor when prefetching.

    Args:
        path: the model directory (a calibrated predictor is looked for there).
        args, cat, model: the config, the checkpoint's catalogue, the built CausalLM.
        weights: the runtime.weights.WeightStore (its plan, accountant, dtype).
        groups, extents: the model's groups and the pack's staging extents, as the plan was validated with.
        profile: the hardware.Profile, or None (misses then move experts to the compute tier, lookahead 1).
        dev: runtime.device.Device.
        prefetch, policy: as for load_offloaded.
        notes: list the load's notes are appended to.
        routing: what is known of the model's routing, as cost.Workload fields (api._routing_facts: the
            trace's per-expert frequencies [MoE layers, E], which are also the policies' prior, the
            trace itself, the predictor's recall), or None.
    """
    routing = routing or {}
    frequencies = routing.get("expert_freq")
    plan, dtype, k = weights.plan, weights.dtype, args.num_experts_per_tok
    experts = [g for g in groups if g.kind == "expert"]
    off = {plan.tiers[g.name] for g in experts} - {plan.compute}
    costs, L = None, 1
    if profile is not None and off:
        try:
            costs = ExpertCosts(profile, plan.compute, dev.kind if plan.compute == "gpu" else None, args, dtype,
                                max(extents[g.name][0] for g in experts), all(extents[g.name][2] for g in experts),
                                next((extents[g.name][3] for g in experts if not extents[g.name][2]), None))
            # a layer's top_k experts must move within the lookahead window to be there in time: the
            # cost model's rule (cost.lookahead), on the prediction stats() makes of this plan
            desc = describe(args, checkpoint_tensors(args, cat), dtype)
            wl = Workload(gpu="fake-gpu" if dev.kind == "fake-gpu" else None, extents=extents, **routing)
            L = predict(desc, plan, profile, wl).expert_lookahead
        except HeteroError as e:
            notes.append(f"expert misses move the expert to the compute tier (no usable hardware figures: {e})")
            costs, L = None, 1
    predictor = None
    if prefetch and any(plan.expert_cache.values()):
        routers = read_routers(cat, model)
        # the predictor looks ahead in decoder layers: L MoE layers span L x the gap between them
        # (Qwen-MoE's mlp_only_layers / decoder_sparse_step leave dense layers in between)
        moe = sorted(routers)
        span = L * max([b - a for a, b in zip(moe, moe[1:])], default=1)
        predictor = load_predictor(path, routers, k, span, notes)
        if predictor.nbytes > predictor_bytes(groups, args):  # fitted deeper than MAX_LOOKAHEAD layers
            notes.append("the calibrated routing predictor is larger than the plan sets aside; using speculative gating")
            predictor = SpeculativeGating(routers, k, span)
        weights.acc.reserve("cpu", predictor.nbytes, "predictor")
    return ExpertManager(weights, expert_slot_bytes(groups, extents), policy, frequencies, prefetch, predictor, costs, L)

