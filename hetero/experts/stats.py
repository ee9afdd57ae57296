"""Run-time figures of the expert runtime, reported as model.stats()["experts"].

Hit rates are by bytes and per tier: computing on the gpu, every expert a token uses is looked up on
the gpu (a hit when it lives there or sits in the gpu cache); a gpu miss is looked up in RAM (a hit
when it lives there or sits in the cpu cache); a RAM miss reads from disk. Computing on the cpu the
lookup starts in RAM.
"""

from collections import defaultdict


class ExpertStats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.hit = defaultdict(int)  # tier -> bytes found there (resident or cached)
        self.cached = defaultdict(int)  # tier -> of those, bytes found in the tier's cache
        self.miss = defaultdict(int)  # tier -> bytes not found there
        self.disk_read_bytes = self.host_to_device_bytes = 0  # moved for experts (prefetch and demand)
        self.prefetched = defaultdict(int)  # tier -> experts filled ahead of use
        self.stall_s = 0.0  # compute thread waiting on expert misses (reads, copies, late prefetches)
        self.miss_predicted_s = self.miss_measured_s = 0.0  # misses served: the cost model's seconds vs measured
        self.decisions = defaultdict(int)  # "cpu" / "gpu": how gpu-tier misses were served
        self.tokens = 0
        self.recall = defaultdict(lambda: [0.0, 0])  # (layer, distance) -> [sum of recalls, predictions]

    def lookup(self, tier: str, nbytes: int, found: bool, cached: bool = False):
        if found:
            self.hit[tier] += nbytes
            self.cached[tier] += nbytes if cached else 0
        else:
            self.miss[tier] += nbytes

    def report(self, lookahead: int, policy: str, prefetch: bool, predictor: str | None, slots: dict,
               slot_bytes: dict, caches: dict) -> dict:
        """The figures as a JSON-able dict (see README "MoE experts")."""
        n = self.tokens
        tiers = sorted(set(self.hit) | set(self.miss))
        by_dist = defaultdict(lambda: [0.0, 0])
        per_layer = {}
        for (layer, d), (s, c) in sorted(self.recall.items()):  # by distance: the farthest prediction wins
            by_dist[d][0] += s
            by_dist[d][1] += c
            per_layer[layer] = s / c
        return {
            "policy": policy, "prefetch": prefetch, "predictor": predictor, "lookahead": lookahead,
            "cache_slots": dict(slots), "slot_bytes": {t: slot_bytes[t] for t in slots},
            # share of the experts routed to that the prediction made furthest ahead (at most
            # `lookahead` layers, the lookahead used) had ranked top: per layer, then their mean
            "recall_by_layer": per_layer,
            "recall": sum(per_layer.values()) / len(per_layer) if per_layer else None,
            "recall_by_distance": {d: s / c for d, (s, c) in sorted(by_dist.items()) if c},
            "hit_rate_by_bytes": {t: self.hit[t] / (self.hit[t] + self.miss[t]) for t in tiers
                                  if self.hit[t] + self.miss[t]},
            "hit_bytes": dict(self.hit), "cache_hit_bytes": dict(self.cached), "miss_bytes": dict(self.miss),
            "tokens": n,
            "disk_read_bytes_per_token": self.disk_read_bytes / n if n else None,
            "host_to_device_bytes_per_token": self.host_to_device_bytes / n if n else None,
            "stall_s": self.stall_s, "stall_s_per_token": self.stall_s / n if n else None,
            "miss_predicted_s": self.miss_predicted_s, "miss_measured_s": self.miss_measured_s,
            "misses_computed_on": dict(self.decisions),
            "prefetched": dict(self.prefetched),
            "evictions": {t: c.evictions for t, c in caches.items()},
            "wasted_prefetches": {t: c.wasted for t, c in caches.items()},
        }
