"""Replaying a routing trace through simulated expert caches, to compare replacement policies.

The trace's tokens run in order, one at a time (decode-style), through the MoE layers in order;
at each (token, layer) the token's k experts are needed at once and so are protected from eviction
while the others are looked up. A miss brings the expert in (evicting the policy's victim when the
cache is full). Hit rate is by bytes: the share of the needed expert bytes already resident.

    score, lru, static   the runtime's policies (experts/policy.py)
    belady               Belady's optimum: evict the resident expert whose next use is farthest
                         away, or cache nothing when the miss's own is farther still (it needs
                         the future, so it lives here, not in the runtime)

With a routing predictor (a trace with its MoE inputs kept), a policy runs as the runtime's expert
manager runs it: at each (token, layer) the experts predicted for the next `lookahead` layers are
protected too and, with prefetch, brought in ahead of their use (after the layer's own misses, a
prediction only taking the slot of an expert expected to wait longer). An expert that arrived ahead
and is then used counts as a hit: it was in the cache when its layer asked, as the runtime's stats
count it. Bytes moved then include the prefetches that were not used.

Caches are "global" (one cache over all layers' experts, like the runtime's per-tier caches) or
"layer" (one per MoE layer, each with the same share of its layer's experts).
"""

import heapq
from dataclasses import dataclass

import numpy as np

from ..errors import HeteroError
from .policy import make_policy

POLICIES = ("score", "lru", "static", "belady")
NEVER = float("inf")


@dataclass
class ReplayResult:
    policy: str
    scope: str
    slots: int  # cache slots in all (global) or summed over layers
    accesses: int
    hits: int
    hit_bytes: int
    total_bytes: int
    tokens: int
    moved_bytes: int = 0  # bytes brought in: every miss's, and every prefetch's (used or not)

    @property
    def moved_bytes_per_token(self) -> float:
        return self.moved_bytes / self.tokens if self.tokens else 0.0

    @property
    def hit_rate_bytes(self) -> float:
        return self.hit_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def miss_bytes_per_token(self) -> float:
        return (self.total_bytes - self.hit_bytes) / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {"policy": self.policy, "scope": self.scope, "slots": self.slots, "accesses": self.accesses,
                "hits": self.hits, "hit_rate": self.hits / self.accesses if self.accesses else 0.0,
                "hit_rate_bytes": self.hit_rate_bytes, "miss_bytes_per_token": self.miss_bytes_per_token,
                "moved_bytes_per_token": self.moved_bytes_per_token, "tokens": self.tokens}


def parse_share(text) -> float:
    """'30%' or '0.3' -> 0.3; HeteroError unless 0 < share <= 1."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise HeteroError(f"--resident {text!r}: give a share of the experts, e.g. 30% or 0.3") from None
    if not 0 < v <= 1:
        raise HeteroError(f"--resident {text!r}: must be more than 0% and at most 100%")
    return v


def _steps(trace):
    """[(layer, [(expert, weight), ...])] in execution order: token-major, then layer."""
    idx = {l: trace.idx[l].tolist() for l in trace.layers}
    w = {l: trace.w[l].tolist() for l in trace.layers}
    for t in range(trace.num_tokens):
        for l in trace.layers:
            yield t, l, list(zip(idx[l][t], w[l][t]))


def _expert_bytes(trace, expert_bytes) -> dict:
    eb = expert_bytes if expert_bytes is not None else trace.meta.get("expert_bytes", 1)
    if isinstance(eb, dict):
        return {int(l): int(v) for l, v in eb.items()}
    return {l: int(eb) for l in trace.layers}


def _next_uses(trace) -> list:
    """For every access in _steps order, the step number at which its expert is needed next (or NEVER)."""
    order = [(s, (l, e)) for s, (_, l, used) in enumerate(_steps(trace)) for e, _ in used]
    out, seen = [NEVER] * len(order), {}
    for i in range(len(order) - 1, -1, -1):
        s, key = order[i]
        out[i] = seen.get(key, NEVER)
        seen[key] = s
    return out


class _Belady:
    """Farthest next use first, with a lazy max-heap per cache (stale entries skipped on pop). A miss
    whose own next use is at least as far as every candidate's is not cached at all (bypassed): the
    online policies may leave a miss out too, so the optimum they are held to must be allowed to."""

    def __init__(self):
        self.next, self.heaps = {}, {}

    def touch(self, cache, key, next_use):
        self.next[key] = next_use
        heapq.heappush(self.heaps.setdefault(cache, []), (-next_use, key))

    def victim(self, cache, resident: set, protected: set, incoming: float = NEVER):
        """The unprotected resident key needed farthest away, if farther than `incoming` (the missing
        key's next use); else None (bypass)."""
        heap, held, out = self.heaps.get(cache, []), [], None
        while heap:
            neg, key = heapq.heappop(heap)
            if key not in resident or self.next.get(key) != -neg:
                continue  # stale: evicted already, or touched again since
            if key in protected:
                held.append((neg, key))
                continue
            out = key
            if -neg <= incoming:  # the missing key is needed no sooner than it: keep it, cache nothing
                held.append((neg, key))
                out = None
            break
        for item in held:
            heapq.heappush(heap, item)
        return out


def _forecasts(trace, predictor, lookahead: int) -> dict:
    """{layer l: [(layer l+d, [N, E] per-token pick probabilities forecast from x_l)] for d = 1..lookahead}."""
    from .calibrate import trace_inputs

    out = {}
    for l in trace.layers:
        for d in range(1, lookahead + 1):
            if l + d in trace.idx:
                scores = predictor.token_scores(l, d, trace_inputs(trace, l))
                if scores is not None:
                    out.setdefault(l, []).append((l + d, scores.numpy()))
    return out


def _predicted(forecasts, t: int, top_k: int) -> list:
    """[(chance, (layer, expert))] the manager acts on at token t: per forecast layer, the experts
    predicted above 1/2, at least top_k of them (as ExpertManager.prepare picks them)."""
    out = []
    for target, scores in forecasts:
        row = scores[t]
        m = min(len(row), max(top_k, int((row > 0.5).sum())))
        out += [(float(row[e]), (target, int(e))) for e in np.argsort(-row, kind="stable")[:m]]
    return out


def replay(trace, policy: str, resident: float = 0.3, scope: str = "global", frequencies=None,
           expert_bytes=None, oracle_steps: int = 0, predictor=None, lookahead: int = 1,
           prefetch: bool = True) -> ReplayResult:
    """Run a trace's accesses through a simulated expert cache.

    Args:
        trace: a RoutingTrace.
        policy: "score", "lru", "static" or "belady".
        resident: the share of all experts (by bytes; experts of a layer share one size) the cache holds.
        scope: "global" (one cache) or "layer" (one per MoE layer).
        frequencies: [L, E] activation frequencies for "static" (and the "score" tie-break); default
            the trace's own (an optimistic static baseline: it knows this text's frequencies).
        expert_bytes: bytes of one expert (int or {layer: int}); default trace.meta["expert_bytes"] or 1.
        oracle_steps: a reference, not a policy anyone can run: the experts of the next `oracle_steps`
            (token, layer) steps are protected too, as if a predictor knew them without error (one
            token ahead is as many steps as MoE layers). It measures how much of the gap to Belady
            knowing the near future would close.
        predictor: a routing predictor (experts/predictor.py) to run the policy as the runtime does: the
            experts it predicts `lookahead` layers ahead are protected, and with `prefetch` brought in
            ahead. Needs the trace's MoE inputs; not for "belady".
    Returns:
        A ReplayResult.
    """
    if policy not in POLICIES:
        raise HeteroError(f"replay policy {policy!r}: choose from {', '.join(POLICIES)}")
    if scope not in ("global", "layer"):
        raise HeteroError(f"replay scope {scope!r}: choose global or layer")
    if predictor is not None and policy == "belady":
        raise HeteroError("Belady's optimum knows the future already: replay it without a predictor")
    E, layers = trace.num_experts, trace.layers
    nbytes = _expert_bytes(trace, expert_bytes)
    if scope == "global":
        total = sum(nbytes[l] * E for l in layers)
        caps = {None: max(int(resident * total // max(nbytes.values())), 1)}
    else:
        caps = {l: max(int(round(resident * E)), 1) for l in layers}
    if frequencies is None:
        frequencies = trace.frequencies()
    pol = None if policy == "belady" else make_policy(policy, frequencies, layers)
    bel = _Belady() if policy == "belady" else None
    nexts = _next_uses(trace) if bel else None
    res = {c: set() for c in caps}
    hits = hit_b = tot_b = acc = moved = 0
    last_t = 0
    steps = list(_steps(trace)) if oracle_steps else None
    forecasts = _forecasts(trace, predictor, lookahead) if predictor is not None else {}
    for s, (t, l, used) in enumerate(steps or _steps(trace)):
        if t != last_t:
            if pol:
                pol.tick()
            last_t = t
        cache = None if scope == "global" else l
        held, cap = res[cache], caps[cache]
        protected = {(l, e) for e, _ in used}
        for _, ll, later in (steps[s + 1:s + 1 + oracle_steps] if oracle_steps else ()):
            protected.update((ll, e) for e, _ in later)
        predicted = _predicted(forecasts[l], t, trace.top_k) if l in forecasts else ()
        protected.update(key for _, key in predicted)
        for e, w in used:
            key, b = (l, e), nbytes[l]
            tot_b += b
            if key in held:
                hits += 1
                hit_b += b
            else:
                moved += b
                if len(held) >= cap:
                    v = bel.victim(cache, held, protected, nexts[acc]) if bel else pol.victim(list(held), protected)
                    if v is not None:
                        held.discard(v)
                if len(held) < cap:
                    held.add(key)
            if bel:
                bel.touch(cache, key, nexts[acc])
            else:
                pol.touch(key, w)
            acc += 1
        for q, key in sorted(predicted, reverse=True) if prefetch else ():  # most likely first, as the manager
            target = None if scope == "global" else key[0]
            into = res[target]
            if key in into:
                continue
            if len(into) >= caps[target]:  # as ExpertCache.make_room with the manager's admission rule
                v = pol.victim(list(into), protected)
                wait = getattr(pol, "expected_wait", None)
                if v is None or (wait is not None and pol.wait(v) <= wait(key, q)):
                    continue
                into.discard(v)
            into.add(key)
            moved += nbytes[key[0]]
    return ReplayResult(policy, scope, sum(caps.values()), acc, hits, hit_b, tot_b, trace.num_tokens, moved)


def compare(trace, policies=POLICIES, resident: float = 0.3, scope: str = "global", frequencies=None,
            expert_bytes=None) -> list[ReplayResult]:
    """replay() for each policy, in the order given."""
    return [replay(trace, p, resident, scope, frequencies, expert_bytes) for p in policies]


HIT_TOKENS = 320  # tokens of a trace the cost model replays for cache hit shares (~1-3 s of Python)
WARM_TOKENS = 64  # of them, the first ones only fill the cache: their compulsory misses are not counted
REPLAY_WORK = 2e6  # most (accesses x cache slots) one replay may cost: a miss looks at every slot
MIN_HIT_TOKENS = 16  # ... but never fewer tokens than this


def replay_window(trace, tokens: int = HIT_TOKENS):
    """The middle `tokens` tokens of a trace (all of a shorter one): what hit_shares replays, and all
    of the trace a loaded model needs to keep for its predictions."""
    n = trace.num_tokens
    if n <= tokens:
        return trace
    start = (n - tokens) // 2
    return trace.slice(start, start + tokens, copy=True)  # a view would keep the whole trace alive in a loaded model


def hit_shares(trace, slots: int, population=None, policy: str = "score", frequencies=None,
               tokens: int = HIT_TOKENS, warm: int = WARM_TOKENS) -> dict:
    """Per expert, the share of its uses an expert cache of `slots` experts serves, replayed on a trace.

    What the cost model uses when a trace exists: an expert homed below a cache's tier costs as the
    cache's tier for this share of its uses and as its home tier for the rest. Only experts in
    `population` (the ones the cache holds, those homed below its tier) pass through the cache; the
    others are not looked up in it. The replay runs the trace's middle `tokens` tokens (counting
    after the first `warm`, once the cache has filled), fewer when a miss's scan over the slots
    would make that more than REPLAY_WORK.

    Args:
        trace: a RoutingTrace.
        slots: experts the cache holds.
        population: (layer, expert) keys that go through the cache; default all.
        policy: the runtime's replacement policy ("score" or "lru"; "static" with frequencies).
        frequencies: prior for the score policy (default the trace's own).
    Returns:
        {(layer, expert): share of its counted uses that hit}, for the keys used after the warm-up.
    """
    # a big MoE with a big cache: fewer tokens, so that loading never spends minutes here
    per_token = max(1, len(trace.layers) * trace.top_k * max(1, int(slots)))
    tokens = max(MIN_HIT_TOKENS, min(tokens, int(REPLAY_WORK / per_token)))
    trace = replay_window(trace, tokens)
    warm = min(warm, trace.num_tokens // 4)
    pol = make_policy(policy, frequencies if frequencies is not None else trace.frequencies(), trace.layers)
    held, cap = set(), max(0, int(slots))
    uses, hits = {}, {}
    last_t = 0
    for t, l, used in _steps(trace):
        if t != last_t:
            pol.tick()
            last_t = t
        protected = {(l, e) for e, _ in used}
        for e, w in used:
            key = (l, e)
            if population is not None and key not in population:
                continue
            hit = key in held
            if t >= warm:
                uses[key] = uses.get(key, 0) + 1
                hits[key] = hits.get(key, 0) + hit
            if not hit and cap:
                if len(held) >= cap:
                    v = pol.victim(list(held), protected)
                    if v is not None:
                        held.discard(v)
                if len(held) < cap:
                    held.add(key)
            pol.touch(key, w)
    return {k: hits[k] / u for k, u in uses.items()}
