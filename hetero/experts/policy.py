"""Replacement policies of the expert caches: which cached expert to give up when a slot is needed.

A key is (layer, expert). The runtime (and the replay tool) tells a policy of every use with
`touch(key, weight)` (weight: the routing weight summed over the tokens that used the expert),
ends every token step with `tick()`, and asks `victim(resident, protected)` for the key to evict;
protected keys (experts predicted to be used next, or in use now) are never chosen.

    score   expected reuse distance from decayed frequency x routing weight and the layer cycle
    lru     least recently used
    static  lowest activation frequency from a routing trace (fixed; the replay tool's baseline)
"""

import numpy as np

from ..errors import HeteroError

DECAY = 0.9  # per token step: an expert unused for ~20 steps keeps about a tenth of its score
PRIOR_STEPS = 10.0  # a prior frequency weighs as much as this many token steps of observed use
MIN_PROBABILITY = 1e-3  # an expert never seen yet: its wait is long but finite, so ties break by layer
VECTOR_MIN = 96  # resident keys from which victim() ranks in numpy: below, its fixed ~60 us cost more than a loop


class ScorePolicy:
    """Evicts the expert whose next use is expected farthest away: an online stand-in for Belady's choice.

    Each expert's chance p of being picked at a token step is its decayed frequency x routing weight
    (uses weighted by their routing weight over the mean weight, summed with DECAY ** steps since, over
    the same sum of ones), pulled towards a prior frequency when one is given. Layers run in a cycle,
    so an expert of layer l is next needed at l's next turn: d MoE-layer steps from the layer running
    now (a whole cycle, L, for that layer itself), then every L steps with chance p:

        expected wait = d + L (1 - p) / p

    Within one layer this is lowest decayed weighted frequency first; across layers it also gives up
    the experts of the layers just run, which wait longest. (Replayed on the trained fixture's held-out
    routing it beat the plain decayed score by ~1.3 points of hit rate; benchmarks/moe_routing.py.)

    Args:
        frequencies: optional prior, layer -> per-expert frequency (a routing trace's).
        decay: the factor applied to every use per token step.
        layers: the MoE layers in execution order (default: learnt from the keys touched).
    """

    name = "score"

    def __init__(self, frequencies: dict | None = None, decay: float = DECAY, layers=None):
        self.prior, self.decay = frequencies or {}, decay
        self.order = sorted(layers) if layers is not None else []
        self.pos = {l: i for i, l in enumerate(self.order)}  # layer -> its place in the cycle
        self.step = 0
        self.current = None  # the layer of the last use: where the cycle is
        self.weight_sum, self.uses = 0.0, 0
        self.scores: dict = {}  # key -> (decayed weighted uses at `since`, since)
        # the same per key seen, by id: decayed weighted uses at `since`, since, the key, its layer's place in the
        # cycle (-1: not in it), its prior and the prior's weight (0: none). Arrays, so that victim() ranks
        # a cache of thousands of experts in numpy rather than in a Python loop
        self._ids: dict = {}
        self._s, self._since, self._pos = np.zeros(64), np.zeros(64, dtype=np.int64), np.zeros(64, dtype=np.int64)
        self._layer, self._expert = np.zeros(64, dtype=np.int64), np.zeros(64, dtype=np.int64)
        self._prior, self._m = np.zeros(64), np.zeros(64)

    def _id(self, key) -> int:
        i = self._ids.get(key)
        if i is not None:
            return i
        i = self._ids[key] = len(self._ids)
        if i == len(self._s):
            for name in ("_s", "_since", "_pos", "_layer", "_expert", "_prior", "_m"):
                a = getattr(self, name)
                setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        row = self.prior.get(key[0])
        self._s[i], self._since[i] = 0.0, self.step
        self._layer[i], self._expert[i] = key
        self._pos[i] = self.pos.get(key[0], -1)
        self._prior[i], self._m[i] = (float(row[key[1]]), PRIOR_STEPS) if row is not None else (0.0, 0.0)
        return i

    def score(self, key) -> float:
        """Decayed weighted uses of `key` (uses weighted by routing weight over the mean weight)."""
        s, since = self.scores.get(key, (0.0, self.step))
        return s * self.decay ** (self.step - since)

    def probability(self, key) -> float:
        """Estimated chance that a token step picks `key`."""
        steps = (1 - self.decay ** (self.step + 1)) / (1 - self.decay)  # the decayed count of steps so far
        row = self.prior.get(key[0])
        prior = float(row[key[1]]) if row is not None else 0.0
        m = PRIOR_STEPS if row is not None else 0.0
        return min(1.0, max(MIN_PROBABILITY, (self.score(key) + m * prior) / (steps + m)))

    def wait(self, key) -> float:
        """Expected MoE-layer steps until `key` is needed again."""
        return self.expected_wait(key, 0.0)

    def expected_wait(self, key, used_next: float) -> float:
        """wait() of `key` when it is used at its layer's next turn with chance `used_next` (a prediction's)."""
        L = len(self.order)
        if not L or key[0] not in self.pos:
            return (1 - used_next) / self.probability(key)
        here = self.pos.get(self.current, 0)
        d = (self.pos[key[0]] - here) % L or L
        p = self.probability(key)
        return d + (1 - used_next) * L * (1 - p) / p

    def touch(self, key, weight: float = 1.0):
        if key[0] not in self.pos:
            self.order = sorted(self.order + [key[0]])
            self.pos = {l: i for i, l in enumerate(self.order)}
            n = len(self._ids)
            self._pos[:n] = [self.pos.get(int(l), -1) for l in self._layer[:n]]
        self.weight_sum += float(weight)
        self.uses += 1
        mean = self.weight_sum / self.uses
        self.scores[key] = (self.score(key) + (float(weight) / mean if mean > 0 else 1.0), self.step)
        i = self._id(key)
        self._s[i], self._since[i] = self.scores[key]
        self.current = key[0]

    def tick(self):
        self.step += 1

    def victim(self, resident, protected: set):
        """The lowest (-wait(k), score(k), k) among the resident keys not protected (None if there is none)."""
        if len(resident) < VECTOR_MIN:
            return self._victim_loop(resident, protected)
        # all at once: at ~1 us a key, the loop took ~2 ms per miss over the ~1800 slots of a 30% cache of
        # a 48-layer, 128-expert model
        get = self._ids.get
        ids = [get(k) for k in resident]
        if None in ids:  # keys never touched: a zero score
            ids = [self._id(k) for k in resident]
        ids = np.array(ids, dtype=np.int64)
        if protected:
            flag = np.zeros(len(self._ids), dtype=bool)
            flag[[i for i in map(get, protected) if i is not None]] = True
            ids = ids[~flag[ids]]
        if not len(ids):
            return None
        decay, step, L = self.decay, self.step, len(self.order)
        score = self._s[ids] * decay ** (step - self._since[ids])
        steps = (1 - decay ** (step + 1)) / (1 - decay)
        m = self._m[ids]  # (without a prior: score / steps, exactly)
        p = np.clip((score + m * self._prior[ids]) / (steps + m), MIN_PROBABILITY, 1.0)
        layer = self._layer[ids]
        if L:
            pos = self._pos[ids]
            d = (pos - self.pos.get(self.current, 0)) % L
            wait = np.where(pos >= 0, np.where(d == 0, L, d) + L * (1 - p) / p, 1 / p)
        else:
            wait = 1 / p
        best = np.flatnonzero(wait == wait.max())
        if len(best) > 1:  # ties: the lower score, then the lower key
            best = best[np.lexsort((self._expert[ids[best]], layer[best], score[best]))]
        i = int(ids[best[0]])
        return int(self._layer[i]), int(self._expert[i])

    def _victim_loop(self, resident, protected: set):
        # _lowest(resident, protected, lambda k: (-self.wait(k), self.score(k), k)), inlined: it runs at every
        # miss, in the runtime and in the cost model's replays
        best, best_rank = None, None
        step, decay, scores, pos, prior = self.step, self.decay, self.scores, self.pos, self.prior
        steps = (1 - decay ** (step + 1)) / (1 - decay)
        L = len(self.order)
        here = pos.get(self.current, 0)
        for k in resident:
            if k in protected:
                continue
            s, since = scores.get(k, (0.0, step))
            score = s * decay ** (step - since)
            row = prior.get(k[0])
            if row is not None:
                p = (score + PRIOR_STEPS * float(row[k[1]])) / (steps + PRIOR_STEPS)
            else:
                p = score / steps
            p = min(1.0, max(MIN_PROBABILITY, p))
            if L and k[0] in pos:
                wait = ((pos[k[0]] - here) % L or L) + L * (1 - p) / p
            else:
                wait = 1 / p
            rank = (-wait, score, k)
            if best_rank is None or rank < best_rank:
                best, best_rank = k, rank
        return best


class LRUPolicy:
    """Least recently used (the demand-loading baseline)."""

    name = "lru"

    def __init__(self, frequencies: dict | None = None):
        self.clock = 0
        self.last: dict = {}

    def touch(self, key, weight: float = 1.0):
        self.clock += 1
        self.last[key] = self.clock

    def tick(self):
        pass

    def victim(self, resident: list, protected: set):
        return _lowest(resident, protected, lambda k: (self.last.get(k, 0), k))


class StaticPolicy:
    """Keeps the experts a routing trace used most; evicts the least frequent. Needs `frequencies`."""

    name = "static"

    def __init__(self, frequencies: dict):
        self.freq = frequencies

    def touch(self, key, weight: float = 1.0):
        pass

    def tick(self):
        pass

    def victim(self, resident: list, protected: set):
        return _lowest(resident, protected, lambda k: (_prior(self.freq, k), k))


def _lowest(resident: list, protected: set, rank):
    """The unprotected key of lowest rank, or None when every resident key is protected."""
    free = [k for k in resident if k not in protected]
    return min(free, key=rank) if free else None


def _prior(freq: dict, key) -> float:
    row = freq.get(key[0])
    return float(row[key[1]]) if row is not None else 0.0


def _as_dict(frequencies, layers) -> dict | None:
    if frequencies is None:
        return None
    if isinstance(frequencies, dict):
        return {int(k): np.asarray(v, dtype=np.float64) for k, v in frequencies.items()}
    arr = np.asarray(frequencies, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"frequencies must be [MoE layers, experts], got shape {arr.shape}")
    layers = list(range(len(arr))) if layers is None else list(layers)
    if len(layers) != len(arr):
        raise ValueError(f"{len(arr)} rows of frequencies for {len(layers)} layers")
    return dict(zip(layers, arr))


def make_policy(name: str, frequencies=None, layers=None):
    """A replacement policy by name.

    Args:
        name: "score" | "lru" | "static".
        frequencies: per-expert activation frequencies: a dict layer -> [E], or an array
            [n MoE layers, E] (RoutingTrace.frequencies()) whose rows are `layers` (default 0, 1, ...).
            Required by "static"; a tie-break prior for "score"; unused by "lru".
        layers: the MoE layers, in order: the row of each array of frequencies (RoutingTrace.layers),
            and the cycle the score policy counts reuse distances in (default: learnt as keys are touched).
    Returns:
        An object with touch(key, weight), tick(), victim(resident, protected) and `name`.
    """
    freq = _as_dict(frequencies, layers)
    if name == "score":
        return ScorePolicy(freq, layers=layers)
    if name == "lru":
        return LRUPolicy(freq)
    if name == "static":
        if freq is None:
            raise HeteroError("the static expert-cache policy needs activation frequencies (a routing trace)")
        return StaticPolicy(freq)
    raise HeteroError(f"expert cache policy {name!r}: choose score, lru or static")
