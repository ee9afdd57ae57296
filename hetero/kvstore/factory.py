"""Which KV cache a loaded model uses, and the KV budget of each tier it gets.

    attention="exact",  no kv_budget  -> cache.KVCache: contiguous, plan.kv_tokens on the compute tier
    attention="exact",  kv_budget     -> paged.PagedKVCache: blocks spill to RAM / disk, attention exact
    attention="retrieval"             -> retrieval.RetrievalKVCache: off-device blocks reached via an ANN index
"""

from functools import partial

from ..errors import HeteroError
from ..placement.groups import kv_bytes_per_token
from ..placement.plan import tier_usage

ATTENTION = ("exact", "retrieval")


def check_attention(attention: str):
    if attention not in ATTENTION:
        raise HeteroError(f"attention {attention!r}: choose one of {', '.join(ATTENTION)}")


def paged(attention: str, kv_budget: int | None) -> bool:
    return attention != "exact" or kv_budget is not None


def kv_budgets(plan, groups, args, dtype, extents=None) -> dict:
    """KV bytes per tier for a paged cache: the plan's KV reservation on the compute tier, and when
    computing on a gpu, the RAM the plan leaves unused (its budget less weights and staging)."""
    use = tier_usage(groups, plan, args, dtype, extents)
    out = {plan.compute: use[plan.compute]["kv"]}
    if plan.compute == "gpu":
        budget = plan.budgets.get("cpu")
        out["cpu"] = (1 << 62) if budget is None else max(0, budget - use["cpu"]["weights"] - use["cpu"]["staging"]
                                                              - use["cpu"]["expert_cache"])
    return out


def kv_cache_factory(attention: str, plan, groups, args, dtype, device, accountant, max_tokens: int,
                     disk_dir=None, extents=None):
    """A callable making a fresh paged / retrieval KV cache per sequence (None: the executor's default).

    Args:
        max_tokens: longest context accepted (at most the model's max_position_embeddings).
        disk_dir: where disk-tier KV blocks go (default: the system's temporary directory).
        extents: the weights' staging extents, as the plan was validated with.
    """
    if attention == "retrieval":
        from .retrieval import RetrievalKVCache as cls
    else:
        from .paged import PagedKVCache as cls
    budgets = kv_budgets(plan, groups, args, dtype, extents)
    return partial(cls, args.num_hidden_layers, plan.compute, device, accountant, budgets, max_tokens, disk_dir)


def tokens_for(kv_budget: int, args, dtype) -> int:
    """Tokens of KV a budget holds on the compute tier (what the plan is asked to reserve)."""
    n = kv_budget // kv_bytes_per_token(args, dtype)
    if n < 1:
        raise HeteroError(f"kv_budget of {kv_budget} bytes holds no token of KV ({kv_bytes_per_token(args, dtype)} bytes each)")
    return n
