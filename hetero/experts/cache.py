"""An expert cache: a fixed number of slots on one tier, each holding one expert ready for compute there.

    gpu cache   experts whose home is not the gpu, copied there (computing on the gpu)
    cpu cache   disk-homed experts read into RAM (and decoded to the compute dtype)

Every slot's bytes (placement.plan.expert_slot_bytes) are reserved with the accountant, under the
purpose "expert_cache", when the cache is made — before any slot is filled — so a full cache never
holds more than the plan counted. Which entry leaves when a slot is needed is the policy's choice
(experts/policy.py); keys that are protected (in use, or predicted next) never leave.
"""

from dataclasses import dataclass


@dataclass
class Entry:
    """One cached expert.

    Attributes:
        tensors: (gate [I, C], up [I, C], down [C, I]) on the cache's tier; None while its reads are in flight.
        staged: the reads in flight (runtime.pipeline.Staged, cpu cache only), landed on first use.
        prefetched: filled ahead of use (by a prediction), not on demand.
        used: computed with since it was filled (an unused prefetch that leaves was wasted).
        to_gpu: once landed, also copy it to the gpu cache (a prefetch for a gpu-computed expert).
    """

    tensors: tuple | None = None
    staged: object = None
    prefetched: bool = False
    used: bool = False
    to_gpu: bool = False

    @property
    def pending(self) -> bool:
        return self.tensors is None


class ExpertCache:
    """Args:
        tier: "gpu" or "cpu".
        slots: how many experts it holds.
        slot_bytes: bytes of one slot (the largest expert ready for compute on `tier`).
        accountant: runtime.memory.Accountant (the slots are reserved on `tier` at once).
        policy: a replacement policy (experts/policy.py make_policy).
        drop: callable(Entry) that waits for an entry's reads in flight before its buffer goes.
    """

    def __init__(self, tier: str, slots: int, slot_bytes: int, accountant, policy, drop=None):
        self.tier, self.slots, self.slot_bytes = tier, slots, slot_bytes
        self.acc, self.policy, self._drop = accountant, policy, drop or (lambda entry: None)
        self.acc.reserve(tier, slots * slot_bytes, "expert_cache")
        self.entries: dict = {}  # (layer, expert) -> Entry
        # keys whose reads are in flight: kept apart so that nothing per layer or per miss walks every slot
        # (a 30%-of-experts cache of a 48-layer, 128-expert model has ~1800 of them)
        self.pending: set = set()
        self.evictions = self.wasted = 0  # entries given up; of those, prefetched and never used

    def __contains__(self, key) -> bool:
        return key in self.entries

    def get(self, key) -> Entry | None:
        return self.entries.get(key)

    def make_room(self, protected: set, admit_wait: float | None = None) -> bool:
        """Free one slot (evicting the policy's victim if the cache is full); False if every entry is protected.

        An entry whose reads are still in flight is not a candidate: giving it up would make the
        compute thread wait for those reads before their buffer could go.

        Args:
            admit_wait: evict only a victim whose expected wait until next use (policy.wait) is longer
                than this (a prefetch's own); None: any victim.
        """
        if self.slots == 0:
            return False
        if len(self.entries) < self.slots:
            return True
        victim = self.policy.victim(self.entries.keys(), protected | self.pending if self.pending else protected)
        if victim is None or (admit_wait is not None and self.policy.wait(victim) <= admit_wait):
            return False
        self.evict(victim)
        return True

    def put(self, key, entry: Entry):
        assert len(self.entries) < self.slots and key not in self.entries, "put without make_room"
        self.entries[key] = entry
        if entry.pending:
            self.pending.add(key)

    def land(self, key, tensors: tuple):
        """The reads of `key`'s entry have landed: its tensors, ready for compute."""
        self.entries[key].tensors = tensors
        self.pending.discard(key)

    def evict(self, key):
        entry = self.entries.pop(key)
        self.pending.discard(key)
        self._drop(entry)
        self.evictions += 1
        self.wasted += entry.prefetched and not entry.used

    def drop_pending(self):
        """After an error: give up every entry whose reads had not landed (waiting for them first)."""
        for key in list(self.pending):
            self._drop(self.entries.pop(key))
        self.pending.clear()

    def close(self):
        for key in list(self.entries):
            self._drop(self.entries.pop(key))
        self.pending.clear()
        self.acc.release(self.tier, self.slots * self.slot_bytes, "expert_cache")
        self.slots = 0
