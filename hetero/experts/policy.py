"""Replacement policies of the expert caches: which cached expert to give up when a slot is needed.

A key is (layer, expert). The runtime (and the replay tool) tells a policy of every use with
`touch(key, weight)` (weight: the routing weight summed over the tokens that used the expert),
ends every token step with `tick()`, and asks `victim(resident, protected)` for the key to evict;
protected keys (experts predicted to be used next, or in use now) are never chosen.

    score   decayed frequency x routing weight: sum over uses of weight * DECAY ** (steps since)
    lru     least recently used
    static  lowest activation frequency from a routing trace (fixed; the replay tool's baseline)
"""

import numpy as np

from ..errors import HeteroError

DECAY = 0.9  # per token step: an expert unused for ~20 steps keeps about a tenth of its score


class ScorePolicy:
    """Decayed frequency x routing weight. Scores decay lazily: stored with the step they were last updated.

    Args:
        frequencies: optional prior, layer -> per-expert frequency (a routing trace's); breaks ties
            between experts with equal scores (e.g. never used yet).
        decay: the factor applied to every score per token step.
    """

    name = "score"

    def __init__(self, frequencies: dict | None = None, decay: float = DECAY):
        self.prior, self.decay = frequencies or {}, decay
        self.step = 0
        self.scores: dict = {}  # key -> (score at `since`, since)

    def score(self, key) -> float:
        s, since = self.scores.get(key, (0.0, self.step))
        return s * self.decay ** (self.step - since)

    def touch(self, key, weight: float = 1.0):
        self.scores[key] = (self.score(key) + float(weight), self.step)

    def tick(self):
        self.step += 1

    def victim(self, resident: list, protected: set):
        return _lowest(resident, protected, lambda k: (self.score(k), _prior(self.prior, k), k))


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
        layers: the model layer index of each row of an array of frequencies (RoutingTrace.layers).
    Returns:
        An object with touch(key, weight), tick(), victim(resident, protected) and `name`.
    """
    freq = _as_dict(frequencies, layers)
    if name == "score":
        return ScorePolicy(freq)
    if name == "lru":
        return LRUPolicy(freq)
    if name == "static":
        if freq is None:
            raise HeteroError("the static expert-cache policy needs activation frequencies (a routing trace)")
        return StaticPolicy(freq)
    raise HeteroError(f"expert cache policy {name!r}: choose score, lru or static")
