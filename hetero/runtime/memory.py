"""The per-tier accountant: what the runtime holds on each tier, its peak, and the budget it promised."""

from ..errors import HeteroError
from ..sizes import format_size


class BudgetExceeded(HeteroError):
    pass


class Accountant:
    """Counts resident bytes per tier (by purpose) and refuses any reservation past a budget.

    Args:
        budgets: tier -> bytes, None for no limit.

    Attributes:
        reclaimers: callables (tier, nbytes) that give up memory held but idle (pooled buffers),
            asked in turn before a reservation that would pass the budget is refused.
    """

    def __init__(self, budgets: dict):
        self.budgets = dict(budgets)
        self.reclaimers: list = []
        self.held = {"gpu": 0, "cpu": 0}
        self.peak = {"gpu": 0, "cpu": 0}
        self.by_purpose: dict[tuple[str, str], int] = {}

    def reserve(self, tier: str, nbytes: int, purpose: str):
        if tier == "disk" or nbytes == 0:
            return
        budget = self.budgets.get(tier)
        for reclaim in self.reclaimers:
            if budget is None or self.held[tier] + nbytes <= budget:
                break
            reclaim(tier, self.held[tier] + nbytes - budget)
        if budget is not None and self.held[tier] + nbytes > budget:
            raise BudgetExceeded(
                f"the {tier} tier would hold {format_size(self.held[tier] + nbytes)} ({purpose}) but its budget is "
                f"{format_size(budget)}; raise the budget or shorten the context"
            )
        self.held[tier] += nbytes
        self.peak[tier] = max(self.peak[tier], self.held[tier])
        key = (tier, purpose)
        self.by_purpose[key] = self.by_purpose.get(key, 0) + nbytes

    def release(self, tier: str, nbytes: int, purpose: str):
        if tier == "disk" or nbytes == 0:
            return
        self.held[tier] -= nbytes
        self.by_purpose[(tier, purpose)] -= nbytes
        assert self.held[tier] >= 0 and self.by_purpose[(tier, purpose)] >= 0, "released more than was held"

    def snapshot(self) -> dict:
        return {
            tier: {
                "held_bytes": self.held[tier],
                "peak_bytes": self.peak[tier],
                "budget_bytes": self.budgets.get(tier),
                **{f"{p}_bytes": n for (t, p), n in self.by_purpose.items() if t == tier},
            }
            for tier in ("gpu", "cpu")
        }
