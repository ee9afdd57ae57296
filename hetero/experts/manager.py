"""The expert runtime of one executor: expert caches, predictive prefetch, miss decisions, stats.

Per MoE layer l (experts/dispatch.py drives it, after the router has chosen):

    begin_layer(l)    score the predictions made earlier for l (recall), tell the policies which
                      experts were used, land prefetched reads that have finished
    prepare(l, x)     queue what layer l needs (its disk-homed misses, read in parallel) and, with
                      prefetch on, what the predictor expects layers l+1..l+L to need, ordered by
                      probability x miss cost, within the slots free or held by unprotected keys
    serve(l, e, n)    expert e's weights where it computes: resident, cached (waiting for its reads
                      if late), or brought in now — on the gpu, or left on the CPU when the cost
                      model (decide.py) says computing there is faster for these n tokens
    end_step(tokens)  one token step done: policies decay, unscored predictions are dropped

Prediction only chooses what is loaded ahead; routing, and so every output, is the model's own.
"""

import time
from contextlib import ExitStack, contextmanager

import torch

from .cache import Entry, ExpertCache
from .policy import make_policy
from .stats import ExpertStats

# Prefetch a layer's predictions only while at least half of them turn out used: when reads are the
# bottleneck a wrong prefetch costs a read's time and a right one saves about one, so below 1/2 demand
# loading is faster. Measured per (target layer, distance), as a moving average over ~10 tokens that
# starts optimistic and keeps being updated while prefetching is off, so it can come back.
MIN_PRECISION = 0.5
PRECISION_DECAY = 0.9


class ExpertManager:
    """Args:
        store: runtime.weights.WeightStore (plan, pipe, accountant, device, resident tensors).
        slot_bytes: placement.plan.expert_slot_bytes of this model, per tier.
        policy: cache replacement policy name ("score", "lru", "static").
        frequencies: per-expert frequencies for the policy (see policy.make_policy), or None.
        prefetch: predict and prefetch (False: demand loading only).
        predictor: a RoutingPredictor (experts/predictor.py), or None.
        costs: a decide.ExpertCosts, or None without a hardware profile (misses then move the expert
            to the compute tier, the way hetero always did).
        lookahead: MoE layers predicted ahead (the predictor covers the decoder layers they span).
    """

    def __init__(self, store, slot_bytes: dict, policy: str = "score", frequencies=None, prefetch: bool = True,
                 predictor=None, costs=None, lookahead: int = 1):
        self.store, self.pipe, self.plan = store, store.pipe, store.plan
        self.compute, self.device = store.compute, store.device
        self.slot_bytes, self.policy_name = slot_bytes, policy
        keys = store.expert_keys()
        self.moe = sorted({layer for layer, _ in keys})  # the MoE layers
        self.caches = {t: ExpertCache(t, n, slot_bytes[t], store.acc, make_policy(policy, frequencies, self.moe),
                                      self._drop)
                       for t, n in self.plan.expert_cache.items() if n}
        self.prefetch, self.predictor, self.costs, self.lookahead = prefetch, predictor, costs, lookahead
        self.E = max((e for _, e in keys), default=-1) + 1
        self.top_k = store.model.args.num_experts_per_tok or 1
        self.home = {key: self.plan.tiers[store.expert_group(*key)] for key in keys}
        self.nbytes = {key: store.groups[store.expert_group(*key)].nbytes for key in keys}
        self.stats = ExpertStats()
        self.predictions: dict = {}  # target layer -> [(MoE layers ahead it was predicted, scores [E])]
        # (target layer, distance) -> moving average of the share of its predicted experts that were used
        self.precision: dict = {}
        self.protected: set = set()  # keys in use or predicted: never evicted
        self.cached: dict = {}  # key in use -> the tiers whose cache held it when its layer began

    # ------------------------------------------------------------ the steps of one MoE layer

    def begin_layer(self, layer: int, idx: torch.Tensor, w: torch.Tensor) -> list[int]:
        """idx [N, k], w [N, k] -> the experts used by layer `layer`, in ascending order."""
        one = idx.shape[0] == 1  # decoding: the token's own k distinct experts, no unique() or scatter
        used = sorted(idx[0].tolist()) if one else torch.unique(idx).tolist()
        for d, scores in self.predictions.pop(layer, ()):
            top = set(torch.topk(scores, min(len(used), len(scores))).indices.tolist())
            hit = len(top & set(used)) / len(used)
            r = self.stats.recall[(layer, d)]
            r[0] += hit
            r[1] += 1
            self.precision[(layer, d)] = PRECISION_DECAY * self.precision.get((layer, d), 1.0) + (1 - PRECISION_DECAY) * hit
        if self.caches:
            # routing weight per expert summed over the tokens, in one pass (E ops per layer were ~20% of
            # the dispatch loop's own time at one token)
            if one:
                weights = dict(zip(idx[0].tolist(), w[0].double().tolist()))
            else:
                weights = torch.zeros(max(self.E, int(idx.max()) + 1), dtype=torch.float64)
                weights.index_add_(0, idx.reshape(-1).long().cpu(), w.reshape(-1).double().cpu())
                weights = weights.tolist()
            for e in used:
                for c in self.caches.values():
                    c.policy.touch((layer, e), weights[e])
        self._advance()
        return used

    def prepare(self, layer: int, x: torch.Tensor, counts: dict):
        """Queue layer `layer`'s misses and (prefetch on) the predicted experts of the next layers.

        Args:
            x: [N, C] the MoE block's input.
            counts: expert -> tokens routed to it in this layer.
        """
        # cached before this layer asked (a demand read queued below is still a miss)
        self.cached = {(layer, e): {t for t, c in self.caches.items() if (layer, e) in c} for e in counts}
        queue = [(float("inf"), (layer, e), n, False, 1.0) for e, n in counts.items()]
        predicted = set()
        if self.prefetch and self.predictor is not None and self.caches:
            N = x.shape[0]
            n_est = max(1, round(N * self.top_k / max(1, self.E)))  # tokens per expert, on average
            for target, scores in self.predictor.predict(layer, x.float().cpu()).items():
                scores = scores.float().cpu()
                if target not in self.moe:
                    continue
                ahead = self.moe.index(target) - self.moe.index(layer)  # in MoE layers
                self.predictions.setdefault(target, []).append((ahead, scores))
                precision = self.precision.get((target, ahead), 1.0)
                if precision < MIN_PRECISION:
                    continue  # measured too often wrong at this distance: its reads would cost more than they save
                # the experts predicted to be among some token's top-k (probability above 1/2), at least
                # top_k: each needless read takes disk time from the reads that are needed
                m = min(len(scores), max(self.top_k, int((scores > 0.5).sum())))
                for e in torch.topk(scores, m).indices.tolist():
                    key = (target, e)
                    predicted.add(key)
                    if self.home[key] != self.compute:
                        q = min(float(scores[e]), precision)  # the chance it is used, as predicted and as measured
                        queue.append((q * self._miss_s(self.home[key], n_est), key, n_est, True, q))
        self.protected = {(layer, e) for e in counts} | predicted
        for _, key, n, ahead, q in sorted(queue, key=lambda item: -item[0]):
            self._issue(key, n, ahead, q)

    @contextmanager
    def serve(self, layer: int, e: int, n: int):
        """Yields (tier the expert computes on, (gate, up, down) there) for n tokens of layer `layer`."""
        key, nb = (layer, e), self.nbytes[(layer, e)]
        home = self.home[key]
        if home == self.compute:
            self.stats.lookup(self.compute, nb, True)
            yield self.compute, self.store.expert_tensors(layer, e)
            return
        if self.compute == "gpu":
            ent = self._get("gpu", key)
            self.stats.lookup("gpu", nb, ent is not None and "gpu" in self.cached.get(key, ()), cached=True)
            if ent is not None:
                yield "gpu", ent.tensors
                return
        t0 = time.perf_counter()
        if home == "cpu":
            host = self.store.expert_tensors(layer, e)
        else:
            ent = self._get("cpu", key)
            host = self._ready(key, ent) if ent is not None else None  # waits if its read is late
        # in RAM before this layer asked (a read queued on demand by prepare() is a miss)
        in_ram = host is not None and (home == "cpu" or "cpu" in self.cached.get(key, ()))
        self.stats.lookup("cpu", nb, in_ram, cached=home != "cpu")
        if self.compute == "cpu" and in_ram:  # a cpu-cache hit
            self.stats.stall_s += time.perf_counter() - t0
            yield "cpu", host
            return
        with ExitStack() as stack:  # a miss: served the way the cost model says is faster for n tokens
            where = "cpu" if in_ram else "disk"  # where the weights were as the miss began
            way = "cpu" if self.compute == "cpu" else self._decide(where, n)
            if host is None and (way == "cpu" or "cpu" in self.caches):  # read into the cpu cache
                host = self._ready(key, self._read(key, False))
                if host is None and self.compute == "gpu":
                    way = "gpu"  # no free cpu slot: straight to the gpu
            if way == "cpu":
                tensors = host if host is not None else stack.enter_context(self.store.expert(layer, e))
            elif host is not None:
                ent = self._copy(key, host, False)
                tensors = ent.tensors if ent is not None else stack.enter_context(self._copy_transient(host))
            else:
                tensors = stack.enter_context(self.store.expert(layer, e))  # read and copied, then dropped
            if self.compute == "gpu":
                self.stats.decisions[way] += 1
            predicted = self._options(where, n).get(way, 0.0)
            self.stats.stall_s += time.perf_counter() - t0
            yield way, tensors
        self.stats.miss_measured_s += time.perf_counter() - t0
        self.stats.miss_predicted_s += predicted

    def end_step(self, tokens: int):
        self.stats.tokens += tokens
        for c in self.caches.values():
            c.policy.tick()
        self.predictions.clear()

    def abort(self):
        """After an error: wait for expert reads in flight and give up the entries they were filling."""
        for c in self.caches.values():
            c.drop_pending()
        self.predictions.clear()

    def close(self):
        for c in self.caches.values():
            c.close()

    # ------------------------------------------------------------ moving experts

    def _issue(self, key, n: int, ahead: bool, q: float = 1.0):
        """Start what `key` needs before it computes: its read into the cpu cache (disk-homed), its copy
        to the gpu cache (a predicted expert that the cost model would move to the gpu). q: the chance
        that a predicted expert is used (1 for this layer's own misses)."""
        home = self.home[key]
        if home == self.compute or key in self.caches.get("gpu", ()):
            return
        if self.compute == "cpu":
            self._read(key, ahead, q)
            return
        gpu = self._decide("cpu", n) == "gpu"  # once the expert is in RAM, is it worth moving?
        if home == "disk":
            ent = self._read(key, ahead, q)  # served from RAM, or read through it on the way to the gpu
            if ent is not None and gpu and ahead:
                ent.to_gpu = True
                if not ent.pending:
                    self._copy(key, ent.tensors, True, q)
        elif gpu and ahead:  # demand copies happen when served: nothing is gained by doing them sooner
            self._copy(key, self.store.expert_tensors(*key), True, q)

    def _admit(self, cache, key, ahead: bool, q: float):
        """For a prefetch: the expected wait (in MoE-layer steps) the victim must exceed to be given up for
        `key` — a prediction must not push out an expert that will be needed sooner. None: no condition."""
        wait = getattr(cache.policy, "expected_wait", None)
        return wait(key, q) if ahead and wait is not None else None

    def _read(self, key, ahead: bool, q: float = 1.0) -> Entry | None:
        """The cpu-cache entry of a disk-homed expert, its reads queued now if it was not cached (None: no slot)."""
        cache = self.caches.get("cpu")
        if cache is None:
            return None
        if key in cache:
            return cache.get(key)
        if not cache.make_room(self.protected, self._admit(cache, key, ahead, q)):
            return None
        group = self.store.expert_group(*key)
        ent = Entry(staged=self.pipe.read_expert(group, urgent=not ahead), prefetched=ahead)
        cache.put(key, ent)
        self.stats.disk_read_bytes += self.store.pack.extents[group]["nbytes"]
        self.stats.prefetched["cpu"] += ahead
        return ent

    def _copy(self, key, host: tuple, ahead: bool, q: float = 1.0) -> Entry | None:
        """The gpu-cache entry of `key`, copied from its host tensors now if it was not cached (None: no slot)."""
        cache = self.caches.get("gpu")
        if cache is None:
            return None
        if key in cache:
            return cache.get(key)
        if not cache.make_room(self.protected, self._admit(cache, key, ahead, q)):
            return None
        ent = Entry(tensors=tuple(self.device.to_tier(t, "gpu") for t in host), prefetched=ahead)
        cache.put(key, ent)
        self._count_copy(sum(t.nbytes for t in host))
        self.stats.prefetched["gpu"] += ahead
        return ent

    @contextmanager
    def _copy_transient(self, host: tuple):
        """Host tensors on the gpu for one use, in the staging the plan counts for one expert."""
        n = sum(t.nbytes for t in host)
        self.store.acc.reserve("gpu", n, "staging")
        try:
            self._count_copy(n)
            yield tuple(self.device.to_tier(t, "gpu") for t in host)
        finally:
            self.store.acc.release("gpu", n, "staging")

    def _count_copy(self, n: int):
        self.stats.host_to_device_bytes += n
        self.store.io["host_to_device_bytes"] += n

    def _ready(self, key, ent: Entry | None) -> tuple | None:
        """An entry's tensors, waiting for its reads (and checking them) if they have not landed."""
        if ent is None:
            return None
        ent.used = True
        if ent.pending:
            host = self.pipe.land_host(ent.staged)
            self.caches["cpu"].land(key, tuple(host[n] for n in self.store.expert_names(*key)))
        return ent.tensors

    def _advance(self):
        """Land cpu-cache reads that have finished (no waiting) and make their requested gpu copies."""
        cpu = self.caches.get("cpu")
        if cpu is None:
            return
        for key in list(cpu.pending):
            ent = cpu.entries[key]
            if self.pipe.landed(ent.staged):
                host = self.pipe.land_host(ent.staged)
                cpu.land(key, tuple(host[n] for n in self.store.expert_names(*key)))
                if ent.to_gpu:
                    self._copy(key, ent.tensors, True)

    def _drop(self, ent: Entry):
        if ent.staged is not None:
            self.pipe.drop(ent.staged)

    def _get(self, tier: str, key) -> Entry | None:
        c = self.caches.get(tier)
        ent = c.get(key) if c is not None else None
        if ent is not None and tier == "gpu":
            ent.used = True
        return ent

    # ------------------------------------------------------------ the cost model's answers

    def _options(self, home: str, n: int) -> dict:
        return self.costs.options(home, n) if self.costs is not None else {}

    def _decide(self, home: str, n: int) -> str:
        return self.costs.decide(home, n) if self.costs is not None else "gpu"

    def _miss_s(self, home: str, n: int) -> float:
        return self.costs.miss_s(home, n) if self.costs is not None else 1.0

    def report(self) -> dict:
        kind = None if self.predictor is None else getattr(self.predictor, "kind", type(self.predictor).__name__)
        return self.stats.report(self.lookahead, self.policy_name, self.prefetch and self.predictor is not None, kind,
                                 {t: c.slots for t, c in self.caches.items()}, self.slot_bytes, self.caches)
