"""The Plan: a home tier for every tensor group, as data (frozen, JSON, editable by hand, validated)."""

import json
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HeteroError
from ..sizes import format_size
from .groups import Group, kv_bytes_per_token

TIERS = ("gpu", "cpu", "disk")
# logits are computed over vocabulary slices of at most this many bytes of lm_head when it is not
# resident on the compute tier, so streaming it never needs a buffer the size of the whole matrix
LM_HEAD_CHUNK_BYTES = 16 * 2**20
EXTENT_ALIGN = 4096  # pack extents start and end on this boundary (flash/pack.py ALIGN), for O_DIRECT
MAX_LOOKAHEAD = 3  # MoE layers whose experts are predicted and prefetched ahead, at most (experts/decide.py)
HEAD_READ_SLACK = 4 * EXTENT_ALIGN  # a direct read of lm_head rows is widened to alignment (flash/pack.py READ_SLACK)


@dataclass(frozen=True)
class Plan:
    """Where every group lives, what computes, and the budgets the plan was made for.

    Attributes:
        tiers: group name -> "gpu" | "cpu" | "disk".
        compute: "gpu" or "cpu" — the tier whose device runs the model.
        budgets: tier -> bytes (None: no limit given).
        kv_tokens: tokens of KV cache reserved on the compute tier.
        depth: prefetch depth — while layer j computes, reads for layers j+1..j+depth are in flight.
        expert_cache: tier -> slots of the expert cache on that tier ("gpu": experts brought to the
            gpu, "cpu": disk-homed experts read into RAM), each slot the size of the largest expert
            (expert_slot_bytes); empty for none.
    """

    tiers: dict = field(hash=False)
    compute: str
    budgets: dict = field(hash=False)
    kv_tokens: int
    depth: int = 1
    expert_cache: dict = field(default_factory=dict, hash=False)

    def tier(self, group: str) -> str:
        return self.tiers[group]

    def to_json(self) -> str:
        return json.dumps(
            {"compute": self.compute, "kv_tokens": self.kv_tokens, "depth": self.depth, "budgets": self.budgets,
             "expert_cache": self.expert_cache, "tiers": self.tiers},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            d = json.loads(text)
            plan = cls(tiers=dict(d["tiers"]), compute=d["compute"], budgets=dict(d["budgets"]), kv_tokens=int(d["kv_tokens"]),
                       depth=int(d.get("depth", 1)),
                       expert_cache={str(t): int(n) for t, n in (d.get("expert_cache") or {}).items()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise HeteroError(f"{source}: not a hetero plan ({e.__class__.__name__}: {e})") from None
        if plan.compute not in ("gpu", "cpu"):
            raise HeteroError(f"{source}: compute must be 'gpu' or 'cpu', not {plan.compute!r}")
        if plan.depth < 1:
            raise HeteroError(f"{source}: depth must be at least 1, not {plan.depth}")
        for t, n in plan.expert_cache.items():
            if t not in ("gpu", "cpu") or n < 0:
                raise HeteroError(f"{source}: expert_cache must map gpu/cpu to a number of slots >= 0, not {t!r}: {n}")
        return plan

    def save(self, path: Path):
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise HeteroError(f"{path}: plan file not found")
        return cls.from_json(path.read_text(), str(path))


def _round_up(n: int, a: int = EXTENT_ALIGN) -> int:
    return -(-n // a) * a


def staging_bytes(groups: list[Group], tiers: dict, compute: str, depth: int = 1, extents: dict | None = None) -> dict[str, int]:
    return _staging(groups, tiers, compute, depth, extents)[0]


def next_token_reads(groups: list[Group], tiers: dict, compute: str, depth: int = 1, extents: dict | None = None) -> int:
    """How many reading layers of the next token the pipeline queues while lm_head streams.

    As many of the first depth + 1 as fit beside lm_head's slice within the staging that the rest
    of the schedule needs anyway, so reading ahead across tokens never raises a budget.
    """
    return _staging(groups, tiers, compute, depth, extents)[1]


def _staging(groups: list[Group], tiers: dict, compute: str, depth: int, extents: dict | None) -> tuple[dict, int]:
    """Transient buffers the executor holds, per tier, to run groups that do not live on the compute tier.

    Mirrors runtime/pipeline.py, which reserves exactly these buffers. Disk-tier groups are read
    whole from the pack into host buffers of their extent's size: while layer j computes, the
    reads of the first depth + 1 layers from j on that read anything are held (layers whose groups
    are all resident are skipped, so reads run ahead of them); while lm_head computes, the first
    such layers of the next token are already being read (next_token_reads). Computing on the cpu, a
    group stored in the compute dtype is used in place (views); otherwise it is converted into
    buffers of its compute-dtype size for layer j. Computing on the gpu, layers j and j+1 are on
    the device (j+1 is copied while j computes), and a group that is not a view also holds its raw
    bytes on the device while being decoded. One expert at a time is fetched on top; lm_head and
    an off-device embedding are streamed in LM_HEAD_CHUNK_BYTES slices after the layers.

    Args:
        depth: the plan's prefetch depth.
        extents: group name -> (extent bytes, data bytes, is a view) from the pack's layout; default:
            a pack in the compute dtype (round_up(nbytes, 4 KiB), nbytes, True).
    """
    def ext(g):
        if extents is not None and g.name in extents:
            return extents[g.name]
        return _round_up(max(g.nbytes, 1)), g.nbytes, True, None

    n_layers = 1 + max([g.layer for g in groups if g.layer is not None], default=-1)
    H = [0] * n_layers  # host bytes read per layer (disk-tier attn + mlp)
    C = [0] * n_layers  # compute-dtype buffers of converted disk groups, computing on the cpu
    D = [0] * n_layers  # device bytes per layer, computing on the gpu
    Q = [0] * n_layers  # raw bytes on the device while one group decodes
    X = [0] * n_layers  # one expert on the compute tier
    XH = [0] * n_layers  # one disk expert's read buffer on the host, computing on the gpu
    head = head_host = host = load = 0
    for g in groups:
        t = tiers[g.name]
        if compute == "gpu" and t == "gpu":
            # loading a gpu-resident group passes through host memory one tensor, or one
            # LM_HEAD_CHUNK_BYTES slice of one, at a time
            host = max(host, int(min(g.stage_bytes, LM_HEAD_CHUNK_BYTES * (1 + g.raw_ratio))))
        if t == compute and t == "cpu":
            load = max(load, g.convert_extra)  # converting a resident tensor at load holds its raw copy
        if t == compute or g.kind == "norms":
            continue
        e, r, view, _ = ext(g) if t == "disk" else (0, g.nbytes, True, None)
        if g.kind in ("lm_head", "embed"):
            chunk = min(g.nbytes, LM_HEAD_CHUNK_BYTES)  # one slice in the compute dtype
            raw = -(-chunk * r // max(g.nbytes, 1)) + HEAD_READ_SLACK if t == "disk" else 0  # the slice as stored
            held = raw + (0 if view else chunk)
            head = max(head, held if compute == "cpu" else chunk)
            head_host = max(head_host, held if compute == "gpu" else 0)
            continue
        l = g.layer
        if compute == "cpu":
            if g.kind == "expert":
                X[l] = max(X[l], e + (0 if view else g.nbytes))
            else:
                H[l] += e
                C[l] += 0 if view else g.nbytes
        else:
            raw = 0 if view else r
            if g.kind == "expert":
                X[l] = max(X[l], g.nbytes + raw)
                XH[l] = max(XH[l], e)
            else:
                D[l] += g.nbytes
                Q[l] = max(Q[l], raw)
                H[l] += e
    reads = [l for l in range(n_layers) if H[l]]
    window = [sum(H[k] for k in reads[bisect_left(reads, j):bisect_left(reads, j) + depth + 1])
              for j in range(n_layers + 1)]  # window[n_layers] = 0
    def ahead(base: int, beside: int) -> int:  # next-token reads that fit beside lm_head under `base`
        k, used = 0, beside
        while k < min(depth + 1, len(reads)) and used + H[reads[k]] <= base:
            used += H[reads[k]]
            k += 1
        return k

    if compute == "cpu":
        stage = max([window[j] + C[j] + X[j] for j in range(n_layers)] + [head, load, 0])
        return {"cpu": stage}, ahead(stage, head)
    nxt = lambda a, j: a[j + 1] if j + 1 < n_layers else 0  # noqa: E731
    gpu = max([D[j] + nxt(D, j) + max(Q[j], nxt(Q, j)) + X[j] for j in range(n_layers)] + [head, 0])
    cpu = max([window[j] + XH[j] for j in range(n_layers)] + [head_host, host, 0])
    return {"gpu": gpu, "cpu": cpu}, ahead(cpu, head_host)


def expert_slot_bytes(groups: list[Group], extents: dict | None = None) -> dict[str, int]:
    """Bytes of one expert-cache slot per tier: the largest expert ready for compute there.

    A gpu slot holds an expert's tensors in the compute dtype (or, when the pack stores them in that
    dtype, the device copy of its extent's data they are views of). A cpu slot holds a disk-homed
    expert's read buffer (its extent) plus, when the pack's tensors are not views in the compute
    dtype, their decoded copies.

    Args:
        extents: as for staging_bytes; default a pack in the compute dtype.
    """
    # one pass, few calls: the planners ask for every candidate placement, of up to ~10^4 experts
    biggest = max((g.nbytes for g in groups if g.kind == "expert"), default=0)
    gpu, cpu = biggest, _round_up(max(biggest, 1)) if biggest else 0  # a pack in the compute dtype
    for g in groups if extents else ():
        x = extents.get(g.name) if g.kind == "expert" else None
        if x is None:
            continue
        e, r, view, _ = x
        n = g.nbytes if not view or g.nbytes >= r else r
        c = e if view else e + g.nbytes
        if n > gpu:
            gpu = n
        if c > cpu:
            cpu = c
    return {"gpu": gpu, "cpu": cpu}


def predictor_bytes(groups: list[Group], args) -> int:
    """Host bytes set aside for the routing predictor beside the expert caches (experts/predictor.py): a
    float32 copy of every MoE router plus room for a calibrated map (weight and bias) of the same
    size per lookahead layer (at most MAX_LOOKAHEAD)."""
    moe_layers = {g.layer for g in groups if g.kind == "expert"}
    return (1 + MAX_LOOKAHEAD) * len(moe_layers) * (args.num_experts or 0) * (args.hidden_size + 1) * 4


def tier_usage(groups: list[Group], plan: Plan, args, dtype, extents: dict | None = None) -> dict[str, dict[str, int]]:
    """Bytes per tier the plan commits: resident weights, staging buffers, expert caches and the KV cache.

    Args:
        extents: the pack layout's extent sizes (see staging_bytes); default: a pack in the compute dtype.
    """
    use = {t: {"weights": 0, "staging": 0, "expert_cache": 0, "kv": 0} for t in TIERS}
    for g in groups:
        use[plan.tiers[g.name]]["weights"] += g.nbytes
    for t, n in staging_bytes(groups, plan.tiers, plan.compute, plan.depth, extents).items():
        use[t]["staging"] += n
    if any(plan.expert_cache.values()):
        slot = expert_slot_bytes(groups, extents)
        for t, n in plan.expert_cache.items():
            use[t]["expert_cache"] += n * slot[t]
        use["cpu"]["expert_cache"] += predictor_bytes(groups, args)
    use[plan.compute]["kv"] = plan.kv_tokens * kv_bytes_per_token(args, dtype)
    return use


def validate(plan: Plan, groups: list[Group], args, dtype, has_gpu: bool, source: str = "plan", extents: dict | None = None):
    """Check that a plan (maybe edited by hand) places every group and fits its budgets."""
    names = {g.name for g in groups}
    missing = [n for n in names if n not in plan.tiers]
    if missing:
        raise HeteroError(f"{source}: no tier for {len(missing)} group(s), e.g. {sorted(missing)[0]!r}")
    unknown = [n for n in plan.tiers if n not in names]
    if unknown:
        raise HeteroError(f"{source}: unknown group {sorted(unknown)[0]!r} (not in this model)")
    bad = {t for t in plan.tiers.values() if t not in TIERS}
    if bad:
        raise HeteroError(f"{source}: tier {sorted(bad)[0]!r} is not one of gpu, cpu, disk")
    if plan.compute == "gpu" and not has_gpu:
        raise HeteroError(f"{source}: computes on the gpu, but there is no accelerator here; re-plan with --vram unset")
    if plan.compute == "cpu" and "gpu" in plan.tiers.values():
        raise HeteroError(f"{source}: places groups on the gpu tier but computes on the cpu")
    if plan.compute == "cpu" and plan.expert_cache.get("gpu"):
        raise HeteroError(f"{source}: has a gpu expert cache but computes on the cpu")
    for tier, use in tier_usage(groups, plan, args, dtype, extents).items():
        budget = plan.budgets.get(tier)
        total = sum(use.values())
        if budget is not None and total > budget:
            raise HeteroError(
                f"{source}: the {tier} tier needs {format_size(total)} (weights {format_size(use['weights'])}, "
                f"staging {format_size(use['staging'])}, expert cache {format_size(use['expert_cache'])}, "
                f"KV {format_size(use['kv'])}) but its budget is {format_size(budget)}"
            )


def plan_table(plan: Plan, groups: list[Group]) -> list[tuple[str, str, str]]:
    """Rows (what, tier(s), bytes) summarising the placement per layer, for the load log."""
    head, tail, by_layer = [], [], {}
    for g in groups:
        if g.layer is not None:
            by_layer.setdefault(g.layer, []).append(g)
        else:
            (tail if g.kind == "lm_head" else head).append((g.name, plan.tiers[g.name], format_size(g.nbytes)))
    rows = []
    for layer, gs in sorted(by_layer.items()):
        parts = [f"{g.kind}:{plan.tiers[g.name]}" for g in gs if g.kind in ("attn", "mlp")]
        experts = [plan.tiers[g.name] for g in gs if g.kind == "expert"]
        if experts:
            parts.append("experts:" + "/".join(f"{experts.count(t)} {t}" for t in TIERS if experts.count(t)))
        rows.append((f"layer {layer}", " ".join(parts), format_size(sum(g.nbytes for g in gs))))
    if any(plan.expert_cache.values()):  # slots of the largest expert in the compute dtype
        biggest = max(g.nbytes for g in groups if g.kind == "expert")
        tail = [("expert caches", ", ".join(f"{t} {n} slots" for t, n in plan.expert_cache.items() if n),
                 format_size(sum(plan.expert_cache.values()) * biggest))] + tail
    return head + rows + tail
