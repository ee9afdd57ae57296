"""The Plan: a home tier for every tensor group, as data (frozen, JSON, editable by hand, validated)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HeteroError
from ..sizes import format_size
from .groups import Group, kv_bytes_per_token

TIERS = ("gpu", "cpu", "disk")
# logits are computed over vocabulary slices of at most this many bytes of lm_head when it is not
# resident on the compute tier, so streaming it never needs a buffer the size of the whole matrix
LM_HEAD_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Plan:
    """Where every group lives, what computes, and the budgets the plan was made for.

    Attributes:
        tiers: group name -> "gpu" | "cpu" | "disk".
        compute: "gpu" or "cpu" — the tier whose device runs the model.
        budgets: tier -> bytes (None: no limit given).
        kv_tokens: tokens of KV cache reserved on the compute tier.
    """

    tiers: dict = field(hash=False)
    compute: str
    budgets: dict = field(hash=False)
    kv_tokens: int

    def tier(self, group: str) -> str:
        return self.tiers[group]

    def to_json(self) -> str:
        return json.dumps(
            {"compute": self.compute, "kv_tokens": self.kv_tokens, "budgets": self.budgets, "tiers": self.tiers},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            d = json.loads(text)
            plan = cls(tiers=dict(d["tiers"]), compute=d["compute"], budgets=dict(d["budgets"]), kv_tokens=int(d["kv_tokens"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise HeteroError(f"{source}: not a hetero plan ({e.__class__.__name__}: {e})") from None
        if plan.compute not in ("gpu", "cpu"):
            raise HeteroError(f"{source}: compute must be 'gpu' or 'cpu', not {plan.compute!r}")
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


def staging_bytes(groups: list[Group], tiers: dict, compute: str) -> dict[str, int]:
    """Transient buffers the executor holds, per tier, to run groups that do not live on the compute tier.

    One layer's attention and MLP are held together with one expert at a time; the layer is released
    before the next, and before lm_head is streamed in LM_HEAD_CHUNK_BYTES slices.
    """
    per_layer: dict[int, int] = {}
    max_expert: dict[int, int] = {}
    head = host = 0
    for g in groups:
        t = tiers[g.name]
        if compute == "gpu" and t != "cpu":
            # reads bound for the gpu (disk groups while running, gpu-resident ones while loading) pass
            # through host memory one tensor, or one LM_HEAD_CHUNK_BYTES slice of one, at a time
            host = max(host, int(min(g.stage_bytes, LM_HEAD_CHUNK_BYTES * (1 + g.raw_ratio))))
        if t == compute or g.kind == "norms":
            continue
        if g.kind in ("attn", "mlp"):
            per_layer[g.layer] = per_layer.get(g.layer, 0) + g.stage_bytes
        elif g.kind == "expert":
            max_expert[g.layer] = max(max_expert.get(g.layer, 0), g.stage_bytes)
        elif g.kind in ("lm_head", "embed"):
            head = max(head, int(min(g.nbytes, LM_HEAD_CHUNK_BYTES) * (1 + g.raw_ratio)))
    layers = set(per_layer) | set(max_expert)
    stage = max([per_layer.get(l, 0) + max_expert.get(l, 0) for l in layers] + [head, 0])
    out = {compute: stage}
    if compute == "gpu":
        out["cpu"] = host
    return out


def tier_usage(groups: list[Group], plan: Plan, args, dtype) -> dict[str, dict[str, int]]:
    """Bytes per tier the plan commits: resident weights, staging buffers and the KV cache."""
    use = {t: {"weights": 0, "staging": 0, "kv": 0} for t in TIERS}
    for g in groups:
        use[plan.tiers[g.name]]["weights"] += g.nbytes
    for t, n in staging_bytes(groups, plan.tiers, plan.compute).items():
        use[t]["staging"] += n
    use[plan.compute]["kv"] = plan.kv_tokens * kv_bytes_per_token(args, dtype)
    return use


def validate(plan: Plan, groups: list[Group], args, dtype, has_gpu: bool, source: str = "plan"):
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
    for tier, use in tier_usage(groups, plan, args, dtype).items():
        budget = plan.budgets.get(tier)
        total = sum(use.values())
        if budget is not None and total > budget:
            raise HeteroError(
                f"{source}: the {tier} tier needs {format_size(total)} (weights {format_size(use['weights'])}, "
                f"staging {format_size(use['staging'])}, KV {format_size(use['kv'])}) but its budget is {format_size(budget)}"
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
    return head + rows + tail
