"""The cost-model planner: a home tier for every group, within the budgets, minimising predicted time.

    1. greedy_plan decides what it always decided: the KV context (shrunk to fit when it was not
       asked for), the staging it implies, and the error naming the minimum when nothing fits.
    2. Prices per byte of each budgeted tier (a Lagrangian relaxation) pick every group's tier by
       seconds saved per byte: what is read every token and costs most to read (lm_head, a tied
       embedding, attention, dense MLPs) before rarely used experts; an untied embedding, only
       gathered row by row, is nearly free on disk. Capacities here are conservative: the budget less
       the worst-case staging, so every step fits.
    3. Local improvement with the exact budget check (plan.tier_usage): single moves into the slack
       that smaller staging leaves, and swaps (promote one group, demote another).
The objective is predicted decode seconds per token (cost.py), plus `prefill_weight` x prefill seconds.
The plan is never worse under the cost model than the greedy one (within 0.5%, greedy's plan is
kept), and always validates.
"""

from dataclasses import replace

import numpy as np

from .cost import Tables, Workload, combine, tables
from .describe import ModelDesc
from .greedy import greedy_plan, minimum_bytes
from .plan import TIERS, Plan, tier_usage

GPU, CPU, DISK = 0, 1, 2
SMALL = 64  # groups: at most this many get the exhaustive local search (the brute-force-checkable sizes)
TIE = 0.005  # predicted gains smaller than this share of greedy's time keep greedy's plan
SWAP_CANDIDATES = 6  # per side and tier, for models with more groups than SMALL


class _State:
    """A placement under evaluation: tier index per group, per-bucket stream sums, bytes per tier."""

    def __init__(self, t: Tables, cur: np.ndarray, weight: float, cost: np.ndarray):
        self.t, self.cur, self.w = t, cur.copy(), weight
        self.cost = cost  # [n, 3] serial seconds: the exact objective change of a move when streams add up
        n = len(cur)
        self.sd, self.sp = t.fixed_decode.copy(), t.fixed_prefill.copy()
        np.add.at(self.sd, t.bucket, t.decode[np.arange(n), cur])
        np.add.at(self.sp, t.bucket, t.prefill[np.arange(n), cur])
        self.bytes = np.bincount(cur, weights=t.nbytes, minlength=3)

    def objective(self) -> float:
        out = combine(self.sd, self.t.overlap)
        return out + self.w * combine(self.sp, self.t.overlap) if self.w else out

    def _bucket_obj(self, b: int, rows_d, rows_p) -> float:
        f = (lambda r: r.max()) if self.t.overlap else (lambda r: r.sum())
        return f(rows_d) + self.w * f(rows_p) if self.w else f(rows_d)

    def delta(self, moves) -> float:
        """Change of the objective if `moves` [(group, new tier)] were applied."""
        if not self.t.overlap:
            return float(sum(self.cost[i, nt] - self.cost[i, self.cur[i]] for i, nt in moves))
        touched = {}
        for i, nt in moves:
            b = int(self.t.bucket[i])
            d, p = touched.get(b, (self.sd[b].copy(), self.sp[b].copy()))
            ot = self.cur[i]
            d += self.t.decode[i, nt] - self.t.decode[i, ot]
            p += self.t.prefill[i, nt] - self.t.prefill[i, ot]
            touched[b] = (d, p)
        return sum(self._bucket_obj(b, d, p) - self._bucket_obj(b, self.sd[b], self.sp[b]) for b, (d, p) in touched.items())

    def byte_delta(self, moves) -> np.ndarray:
        out = np.zeros(3)
        for i, nt in moves:
            out[nt] += self.t.nbytes[i]
            out[self.cur[i]] -= self.t.nbytes[i]
        return out

    def apply(self, moves):
        for i, nt in moves:
            b, ot = int(self.t.bucket[i]), self.cur[i]
            self.sd[b] += self.t.decode[i, nt] - self.t.decode[i, ot]
            self.sp[b] += self.t.prefill[i, nt] - self.t.prefill[i, ot]
            self.bytes[nt] += self.t.nbytes[i]
            self.bytes[ot] -= self.t.nbytes[i]
            self.cur[i] = nt


def _lagrange(cost: np.ndarray, nbytes: np.ndarray, free: list, movable: np.ndarray) -> np.ndarray:
    """Tier per group minimising cost + price[tier] * bytes, with prices raised until each budgeted tier fits `free`."""
    price = np.zeros(3)
    b = nbytes.astype(float)

    def choose(pr):
        c = cost + pr[None, :] * b[:, None]
        return np.where(movable, c.argmin(axis=1), cost.argmin(axis=1))

    def used(choice, tier):
        return float(b[(choice == tier) & movable].sum())

    finite = cost[np.isfinite(cost)]
    top = (finite.max() - finite.min() + 1e-9) / max(1.0, float(b[b > 0].min() if (b > 0).any() else 1.0)) * 4 + 1e-9
    for _ in range(3):
        for tier in (GPU, CPU):
            if free[tier] is None:
                continue
            trial = price.copy()
            trial[tier] = 0.0
            if used(choose(trial), tier) <= free[tier]:
                price[tier] = 0.0
                continue
            lo, hi = 0.0, top
            for _ in range(36):
                trial[tier] = (lo + hi) / 2
                lo, hi = (trial[tier], hi) if used(choose(trial), tier) > free[tier] else (lo, trial[tier])
            price[tier] = hi
    return choose(price)


def _fits(state: _State, free: list) -> bool:
    return all(free[t] is None or state.bytes[t] <= free[t] + 1e-6 for t in (GPU, CPU))


def _gains(state: _State, idx: np.ndarray, nt: int) -> np.ndarray:
    """Objective decrease of moving each group of `idx` alone to tier `nt`."""
    if not state.t.overlap:
        return state.cost[idx, state.cur[idx]] - state.cost[idx, nt]
    return np.array([-state.delta([(int(i), nt)]) for i in idx])


def _repair(state: _State, free: list, movable: np.ndarray, allowed: list):
    """Demote the groups that save least per byte until the conservative capacities hold."""
    for tier in (GPU, CPU):
        if free[tier] is None or state.bytes[tier] <= free[tier]:
            continue
        down = min(t for t in allowed if t > tier)
        idx = np.where((state.cur == tier) & movable)[0]
        loss = -_gains(state, idx, down) / np.maximum(1, state.t.nbytes[idx])
        for k in np.argsort(loss, kind="stable"):
            if state.bytes[tier] <= free[tier]:
                break
            state.apply([(int(idx[k]), down)])


def _moves(state: _State, cand: np.ndarray, allowed: list):
    """Single moves and pair swaps over the candidate groups."""
    singles = [[(int(i), t)] for i in cand for t in allowed if t != state.cur[i]]
    yield from singles
    for a in singles:
        for bm in singles:
            if a[0][0] < bm[0][0]:
                yield a + bm


def plan_model(desc: ModelDesc, budgets: dict, compute: str, context: int, profile, workload: Workload = Workload(),
               fixed_context: bool = False, prefill_weight: float = 0.0, tabs: Tables | None = None, **staging) -> Plan:
    """Place every group of `desc` within `budgets`, minimising predicted decode time per token.

    Args:
        desc: the model (describe.describe / describe_dir).
        budgets: {"gpu": bytes | None, "cpu": bytes | None}; None means unlimited.
        compute: "gpu" or "cpu".
        context: tokens of KV cache to reserve (shrunk to fit unless fixed_context, as greedy_plan does).
        profile: the machine's hardware.Profile.
        workload: prompt/answer lengths and how the executor runs (cost.Workload).
        prefill_weight: weight of one prefill's seconds next to one decoded token's (0: decode only).
        tabs: cost.tables(desc, profile, workload, compute), when the caller has them already.
        staging: passed on to greedy_plan / tier_usage (e.g. the pack's extents).
    Returns:
        A Plan that validates against the budgets.
    Raises:
        HeteroError: the budgets are below the minimum working set (the message names it).
    """
    groups, args, dtype = list(desc.groups), desc.args, desc.dtype
    base = greedy_plan(groups, args, dtype, budgets, compute, context, fixed_context, **staging)
    t = tabs or tables(desc, profile, workload, compute)
    allowed = [GPU, CPU, DISK] if compute == "gpu" else [CPU, DISK]
    comp = TIERS.index(compute)
    movable = np.array([g.kind != "norms" for g in groups])
    limits = {TIERS.index(k): v for k, v in base.budgets.items() if k in ("gpu", "cpu")}
    need = minimum_bytes(groups, args, dtype, compute, base.kv_tokens, **_min_kw(base, staging))
    norms = sum(g.nbytes for g in groups if g.kind == "norms")
    free = [None, None, None]
    for tier in allowed[:-1]:
        if limits.get(tier) is not None:
            # the norms' bytes sit in `need` and in the tier's weights alike: count them once
            free[tier] = limits[tier] - need.get(TIERS[tier], 0) + (norms if tier == comp else 0)

    cost = t.decode.sum(axis=2)  # [n, 3] serial seconds (inf where the tier cannot hold the group)
    if prefill_weight:
        cost = cost + prefill_weight * t.prefill.sum(axis=2)
    cost[:, [x for x in range(3) if x not in allowed]] = np.inf
    state = _State(t, _lagrange(cost, t.nbytes, free, movable), prefill_weight, cost)
    _repair(state, free, movable, allowed)
    _fill(state, free, movable, allowed)

    def exact_ok(cur) -> bool:
        tiers = {g.name: TIERS[c] for g, c in zip(groups, cur)}
        use = tier_usage(groups, replace(base, tiers=tiers), args, dtype, **_usage_kw(staging))
        return all(base.budgets.get(k) is None or sum(use[k].values()) <= base.budgets[k] for k in ("gpu", "cpu"))

    kv = need.get(compute, 0) - minimum_bytes(groups, args, dtype, compute, 0, **_min_kw(base, staging)).get(compute, 0)
    room = [None if limits.get(x) is None else limits[x] - (kv if x == comp else 0) for x in range(3)]
    _improve(state, allowed, movable, exact_ok, room, small=len(groups) <= SMALL)
    best = replace(base, tiers={g.name: TIERS[c] for g, c in zip(groups, state.cur)})
    if not exact_ok(state.cur):
        return base
    greedy_obj = _State(t, np.array([TIERS.index(base.tiers[g.name]) for g in groups]), prefill_weight, cost).objective()
    # a near tie goes to greedy's execution-order placement: its disk groups are contiguous runs of the
    # file, which read faster than the cost model (one bandwidth per read size) can tell
    return best if state.objective() < greedy_obj * (1 - TIE) else base


def _min_kw(base: Plan, staging: dict) -> dict:
    kw = {k: v for k, v in staging.items() if k == "extents"}
    if getattr(base, "depth", 1) != 1:
        kw["depth"] = base.depth
    return kw


def _usage_kw(staging: dict) -> dict:
    return {k: v for k, v in staging.items() if k == "extents"}


def _fill(state: _State, free: list, movable: np.ndarray, allowed: list):
    """Promote groups into leftover conservative capacity, most seconds saved per byte first (two passes)."""
    for _ in range(2):
        options = []
        for nt in allowed:
            idx = np.where(movable & (state.cur > nt))[0]
            gain = _gains(state, idx, nt)
            keep = gain > 1e-15
            options += zip((-gain[keep] / np.maximum(1, state.t.nbytes[idx[keep]])).tolist(), idx[keep].tolist(), [nt] * int(keep.sum()))
        changed = False
        for _, i, nt in sorted(options):
            mv = [(i, nt)]
            if nt < state.cur[i] and _fits_after(state, mv, free) and state.delta(mv) < -1e-15:
                state.apply(mv)
                changed = True
        if not changed:
            return


def _fits_after(state: _State, moves, free: list) -> bool:
    after = state.bytes + state.byte_delta(moves)
    return all(free[t] is None or after[t] <= free[t] + 1e-6 for t in (GPU, CPU))


def _improve(state: _State, allowed: list, movable: np.ndarray, exact_ok, room: list, small: bool):
    """Best-improvement local search with the exact budget check; exhaustive over all groups for small models.

    Args:
        room: bytes of weights each tier could hold with no staging at all (a cheap filter before the exact check).
    """
    for _ in range(200 if small else 4):
        cand = np.where(movable)[0] if small else _boundary(state, movable)
        scored = []
        for mv in _moves(state, cand, allowed):
            d = state.delta(mv)
            if d < -1e-12 and _fits_after(state, mv, room):
                scored.append((d, mv))
        scored.sort(key=lambda x: x[0])
        for d, mv in scored[:64 if small else 8]:
            trial = state.cur.copy()
            for i, nt in mv:
                trial[i] = nt
            if exact_ok(trial):
                state.apply(mv)
                break
        else:
            return


def _boundary(state: _State, movable: np.ndarray) -> np.ndarray:
    """The groups where a swap can pay off: the least valuable of each tier and the most valuable below it."""
    t = state.t
    serial = t.decode.sum(axis=2)
    idx = np.where(movable)[0]
    gain = (serial[idx, DISK] - np.where(np.isfinite(serial[idx, 0]), serial[idx, 0], serial[idx, 1])) / np.maximum(1, t.nbytes[idx])
    out = set()
    for tier in (GPU, CPU, DISK):
        sel = idx[state.cur[idx] == tier]
        g = gain[state.cur[idx] == tier]
        order = np.argsort(g)
        out.update(sel[order[:SWAP_CANDIDATES]].tolist())
        out.update(sel[order[-SWAP_CANDIDATES:]].tolist())
    return np.array(sorted(out), dtype=np.int64)
