"""The cost-model planner: a home tier for every group, within the budgets, minimising predicted time.

    1. greedy_plan decides what it always decided: the KV context (shrunk to fit when it was not
       asked for), the staging it implies, and the error naming the minimum when nothing fits.
    2. Prices per byte of each budgeted tier (a Lagrangian relaxation) pick every group's tier by
       seconds saved per byte: what is read every token and costs most to read (lm_head, a tied
       embedding, attention, dense MLPs) before rarely used experts; an untied embedding, only
       gathered row by row, is nearly free on disk. Capacities here are conservative: the budget less
       the worst-case staging, so every step fits.
    3. Local improvement with the exact budget check (plan.tier_usage), from three starts (the
       prices' placement, everything on the fastest tier pared down to fit, and greedy's own): single
       moves into the slack that smaller staging leaves, and swaps (promote one group, demote another).
The objective is predicted decode seconds per token (cost.py: the executor's schedule replayed over
the placement, reads overlapping compute as the prefetch pipeline runs them), plus `prefill_weight`
x prefill seconds; serial seconds (nothing overlapped) rank moves where there are too many to replay.
The plan is never worse under the cost model than the greedy one, and greedy's plan is kept unless
ours is predicted faster by more than TIE (the model's measured error); it always validates.
"""

from dataclasses import replace

import numpy as np

from .cost import Tables, Workload, combine, contend, expert_schedule, predict, tables
from .describe import ModelDesc
from .greedy import cache_tiers, greedy_plan, minimum_bytes
from .plan import TIERS, Plan, next_token_reads, tier_usage
from .schedule import TIME

GPU, CPU, DISK = 0, 1, 2
SMALL = 64  # groups: at most this many get the exhaustive local search (the brute-force-checkable sizes)
ALL_PAIRS = 16  # candidates: at most this many try every pair of moves; more pair the PAIR_BEST best single moves
PAIR_BEST = 12
# predicted gains below this share of greedy's time keep greedy's plan: the cost model's error on a
# disk-bound plan (its reads' overlap with compute, the disk's drift) is about this large when measured
# (benchmarks/plan_accuracy.py, err@now), so a smaller predicted gain is no evidence of a real one
TIE = 0.15
SWAP_CANDIDATES = 6  # per side and tier, for models with more groups than SMALL


class _State:
    """A placement under evaluation: tier index per group, per-bucket cost sums, bytes per tier.

    The objective replays the executor's schedule over the buckets (cost.combine); `serial_delta`
    is its cheap stand-in (every second counted, nothing overlapped) for ranking many moves at once.
    """

    def __init__(self, t: Tables, cur: np.ndarray, weight: float, cost: np.ndarray, sched: dict, nxt=None):
        self.t, self.cur, self.w = t, cur.copy(), weight
        self.cost = cost  # [n, 3] serial seconds per group and tier
        self.sched = sched  # depth, gpu: how the executor runs this plan
        self.nxt = nxt  # placement [n] -> the next token's reads queued during lm_head (None: depth + 1)
        n = len(cur)
        self.sd, self.sp = t.fixed_decode.copy(), t.fixed_prefill.copy()
        np.add.at(self.sd, t.bucket, t.decode[np.arange(n), cur])
        np.add.at(self.sp, t.bucket, t.prefill[np.arange(n), cur])
        self.bytes = np.bincount(cur, weights=t.nbytes, minlength=3)
        self._obj = None

    def _of(self, sd, sp, cur) -> float:
        nxt = self.nxt(cur) if self.nxt else None
        sd = contend(sd, self.t.overlap, *self.t.contention)  # as overlapped reads and compute slow each other
        issuers = expert_schedule(self.t, sd)[1]  # the runtime's lookahead follows the placement's bottleneck
        out = combine(sd, self.t.overlap, next_reads=nxt, issuers=issuers, **self.sched)
        if not self.w:
            return out
        sp = contend(sp, self.t.overlap, *self.t.contention)
        return out + self.w * combine(sp, self.t.overlap, next_reads=nxt, steady=False, issuers=issuers, **self.sched)

    def objective(self) -> float:
        if self._obj is None:
            self._obj = self._of(self.sd, self.sp, self.cur)
        return self._obj

    def serial_delta(self, moves) -> float:
        return float(sum(self.cost[i, nt] - self.cost[i, self.cur[i]] for i, nt in moves))

    def delta(self, moves) -> float:
        """Change of the objective if `moves` [(group, new tier)] were applied."""
        if not self.t.overlap:
            return self.serial_delta(moves)
        sd, sp, cur = self.sd.copy(), self.sp.copy(), self.cur.copy()
        for i, nt in moves:
            b, ot = int(self.t.bucket[i]), cur[i]
            sd[b] += self.t.decode[i, nt] - self.t.decode[i, ot]
            sp[b] += self.t.prefill[i, nt] - self.t.prefill[i, ot]
            cur[i] = nt
        return self._of(sd, sp, cur) - self.objective()

    def byte_delta(self, moves) -> np.ndarray:
        out = np.zeros(3)
        for i, nt in moves:
            out[nt] += self.t.nbytes[i]
            out[self.cur[i]] -= self.t.nbytes[i]
        return out

    def apply(self, moves):
        self._obj = None
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
    """Serial seconds saved by moving each group of `idx` alone to tier `nt` (the ranking heuristics' measure)."""
    return state.cost[idx, state.cur[idx]] - state.cost[idx, nt]


def _repair(state: _State, free: list, movable: np.ndarray, allowed: list, relative: bool = False):
    """Demote the groups that save least per byte until the conservative capacities hold.

    Args:
        relative: `free` gives bytes to take off each tier instead of capacities.
    """
    for tier in (GPU, CPU):
        if free[tier] is None:
            continue
        goal = state.bytes[tier] - free[tier] if relative else free[tier]
        if state.bytes[tier] <= goal:
            continue
        down = min(t for t in allowed if t > tier)
        idx = np.where((state.cur == tier) & movable)[0]
        loss = -_gains(state, idx, down) / np.maximum(1, state.t.nbytes[idx])
        for k in np.argsort(loss, kind="stable"):
            if state.bytes[tier] <= goal:
                break
            state.apply([(int(idx[k]), down)])


def _moves(state: _State, cand: np.ndarray, allowed: list, room: list):
    """(objective change, move) of single moves and pairs over the candidate groups, improving ones only.

    Every pair when there are at most ALL_PAIRS candidates; otherwise pairs of the PAIR_BEST best
    single moves of each direction (a promotion with a demotion that makes room for it, or two of a kind).
    """
    singles = [[(int(i), t)] for i in cand for t in allowed if t != state.cur[i]]
    scored = [(state.delta(mv), mv) for mv in singles]
    out = [(d, mv) for d, mv in scored if d < -1e-12 and _fits_after(state, mv, room)]
    if len(cand) <= ALL_PAIRS:
        pool = singles
    else:
        ups = sorted((x for x in scored if x[1][0][1] < state.cur[x[1][0][0]]), key=lambda x: x[0])[:PAIR_BEST]
        downs = sorted((x for x in scored if x[1][0][1] > state.cur[x[1][0][0]]), key=lambda x: x[0])[:PAIR_BEST]
        pool = [mv for _, mv in ups + downs]
    for k, a in enumerate(pool):
        for b in pool[k + 1:]:
            if a[0][0] != b[0][0]:
                mv = a + b
                if _fits_after(state, mv, room):
                    d = state.delta(mv)
                    if d < -1e-12:
                        out.append((d, mv))
    return out


def plan_model(desc: ModelDesc, budgets: dict, compute: str, context: int, profile, workload: Workload = Workload(),
               fixed_context: bool = False, prefill_weight: float = 0.0, tabs: Tables | None = None, tie: float = TIE,
               **staging) -> Plan:
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
        tie: greedy's plan is kept unless ours is predicted faster by more than this share (0: the
            optimiser's plan whenever it is predicted faster at all).
        staging: passed on to greedy_plan / tier_usage (e.g. the pack's extents; expert_freq defaults to
            the workload's).
    Returns:
        A Plan that validates against the budgets.
    Raises:
        HeteroError: the budgets are below the minimum working set (the message names it).
    """
    groups, args, dtype = list(desc.groups), desc.args, desc.dtype
    staging.setdefault("expert_freq", workload.expert_freq)  # measured frequencies place the homes
    base = greedy_plan(groups, args, dtype, budgets, compute, context, fixed_context, **staging)
    if workload.extents is None and staging.get("extents"):  # read sizes as the pack lays them out
        workload = replace(workload, extents=staging["extents"])
        tabs = None
    t = tabs or tables(desc, profile, workload, compute)
    sched = {"depth": base.depth, "gpu": compute == "gpu"}
    extents = staging.get("extents") or workload.extents

    def nxt(cur) -> int:
        return next_token_reads(groups, {g.name: TIERS[c] for g, c in zip(groups, cur)}, compute, base.depth, extents)

    small = len(groups) <= SMALL
    state_of = lambda cur, exact=small: _State(t, cur, prefill_weight, cost, sched, nxt if exact else None)  # noqa: E731
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

    cost = t.decode[..., TIME].sum(axis=2)  # [n, 3] serial seconds (inf where the tier cannot hold the group)
    if prefill_weight:
        cost = cost + prefill_weight * t.prefill[..., TIME].sum(axis=2)
    cost[:, [x for x in range(3) if x not in allowed]] = np.inf

    def excess(cur) -> dict:
        """Bytes over budget per tier index, by the exact accounting (plan.tier_usage)."""
        tiers = {g.name: TIERS[c] for g, c in zip(groups, cur)}
        use = tier_usage(groups, replace(base, tiers=tiers), args, dtype, **_usage_kw(staging))
        return {TIERS.index(k): sum(use[k].values()) - base.budgets[k] for k in ("gpu", "cpu")
                if base.budgets.get(k) is not None and sum(use[k].values()) > base.budgets[k]}

    def exact_ok(cur) -> bool:
        return not excess(cur)

    kv = need.get(compute, 0) - minimum_bytes(groups, args, dtype, compute, 0, **_min_kw(base, staging)).get(compute, 0)
    room = [None if limits.get(x) is None else limits[x] - (kv if x == comp else 0) for x in range(3)]
    # starts: prices per byte within the conservative capacities; for models small enough to search
    # exhaustively also everything on the fastest tier pared down by the exact accounting (which sees
    # the staging a fuller placement saves) and greedy's own placement (big models spend their time
    # in the exact budget checks)
    lagrange = state_of(_lagrange(cost, t.nbytes, free, movable))
    _repair(lagrange, free, movable, allowed)
    _fill(lagrange, free, movable, allowed)
    greedy_cur = np.array([TIERS.index(base.tiers[g.name]) for g in groups])
    starts = [lagrange]
    if small:
        starts += [state_of(np.where(movable, allowed[0], comp)), state_of(greedy_cur)]
    best_state = None
    for state in starts:
        for _ in range(4 * len(allowed)):  # demote what the exact budgets do not hold
            over = excess(state.cur)
            if not over:
                break
            for tier, n in over.items():
                _repair(state, [n if x == tier else None for x in range(3)], movable, allowed, relative=True)
        if not exact_ok(state.cur):
            continue
        _improve(state, allowed, movable, exact_ok, excess, room, small=small)
        if best_state is None or state.objective() < best_state.objective():
            best_state = state
    if best_state is None:
        return base
    tiers = {g.name: TIERS[c] for g, c in zip(groups, best_state.cur)}
    used = cache_tiers(groups, tiers, compute)  # an expert cache the placement does not use is given back
    best = replace(base, tiers=tiers, expert_cache={k: n for k, n in base.expert_cache.items() if k in used})

    def predicted(plan) -> float:  # as cost.predict gives it, expert caches included
        p = predict(desc, plan, profile, workload, t)
        return p.decode_s_per_token + prefill_weight * p.prefill_s
    # a near tie goes to greedy's execution-order placement (nothing to gain within the model's error)
    return best if predicted(best) < predicted(base) * (1 - tie) else base


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
            if nt < state.cur[i] and _fits_after(state, mv, free) and state.serial_delta(mv) < -1e-15:
                state.apply(mv)
                changed = True
        if not changed:
            return


def _fits_after(state: _State, moves, free: list) -> bool:
    after = state.bytes + state.byte_delta(moves)
    return all(free[t] is None or after[t] <= free[t] + 1e-6 for t in (GPU, CPU))


def _improve(state: _State, allowed: list, movable: np.ndarray, exact_ok, excess, room: list, small: bool):
    """Best-improvement local search with the exact budget check; exhaustive over all groups for small models.

    Args:
        room: bytes of weights each tier could hold with no staging at all (a cheap filter before the exact check).
    """
    for _ in range(200 if small else 4):
        cand = np.where(movable)[0] if small else _boundary(state, movable)
        scored = _moves(state, cand, allowed, room)
        scored.sort(key=lambda x: x[0])
        for d, mv in scored[:64 if small else 8]:
            trial = state.cur.copy()
            for i, nt in mv:
                trial[i] = nt
            if exact_ok(trial):
                state.apply(mv)
                break
        else:  # tiny models, where staging dominates the budgets: chain moves too
            if len(cand) > ALL_PAIRS or not _eject(state, cand, allowed, excess):
                return


def _demote_until_fits(state: _State, allowed: list, excess, keep: set, rule: str):
    """Demote groups (not those in `keep`) until the exact budgets hold, cheapest serial seconds per byte first.

    rule "one step": from an over-budget tier to the next tier down; "any tier": to any lower tier,
    taking only demotions that shrink the total excess (so RAM is not overfilled to relieve the gpu).
    """
    while over := excess(state.cur):
        if rule == "one step":
            tier = next(iter(over))
            down = [t for t in allowed if t > tier]
            idx = [int(j) for j in np.where(state.cur == tier)[0]
                   if j not in keep and down and np.isfinite(state.t.decode[j, down[0]]).all()]
            if not idx:
                return
            j = min(idx, key=lambda j: state.serial_delta([(j, down[0])]) / state.t.nbytes[j])
            state.apply([(j, down[0])])
            continue
        options = sorted((state.serial_delta([(int(j), t)]) / state.t.nbytes[j], int(j), t)
                         for tier in over for j in np.where(state.cur == tier)[0] if j not in keep
                         for t in allowed if t > tier and np.isfinite(state.t.decode[j, t]).all())[:12]
        total = sum(over.values())
        for _, j, t in options:
            prev = int(state.cur[j])
            state.apply([(j, t)])
            if sum(excess(state.cur).values()) < total:
                break
            state.apply([(j, prev)])
        else:
            return


def _eject(state: _State, cand: np.ndarray, allowed: list, excess) -> bool:
    """A chain move: promote one or two groups, demote the least valuable until the exact budgets hold, refill.

    Finds what single moves and swaps cannot, e.g. lm_head onto the gpu for an expert off it and the
    embedding into the RAM that frees. Returns whether an improving chain was applied.
    """
    ups = [[(int(i), nt)] for i in cand for nt in allowed if nt < state.cur[i]]
    chains = ups + [a + b for k, a in enumerate(ups) for b in ups[k + 1:] if a[0][0] != b[0][0]]
    for up in chains:
        for rule in ("one step", "any tier"):
            before, cur = state.objective(), state.cur.copy()
            state.apply(up)
            _demote_until_fits(state, allowed, excess, {i for i, _ in up}, rule)
            if not excess(state.cur):  # refill what the demotions freed, best serial seconds per byte first
                for mv in sorted((m for m in ups if m[0][1] < state.cur[m[0][0]] and state.serial_delta(m) < 0),
                                 key=lambda m: state.serial_delta(m) / state.t.nbytes[m[0][0]]):
                    i, prev = mv[0][0], int(state.cur[mv[0][0]])
                    if mv[0][1] < prev:
                        state.apply(mv)
                        if excess(state.cur):
                            state.apply([(i, prev)])
                if state.objective() < before - 1e-12 and not excess(state.cur):
                    return True
            state.apply([(int(k), int(c)) for k, c in enumerate(cur) if state.cur[k] != c])
    return False


def _boundary(state: _State, movable: np.ndarray) -> np.ndarray:
    """The groups where a swap can pay off: the least valuable of each tier and the most valuable below it."""
    t = state.t
    serial = state.cost
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
