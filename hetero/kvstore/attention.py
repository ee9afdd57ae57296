"""Attention over pieces of a KV cache, merged exactly with log-sum-exp.

A query's softmax over a union of disjoint key sets A ∪ B is recovered from the two partial results:
with lse_X = log Σ_{j∈X} exp(s_j) and o_X = Σ_{j∈X} softmax_X(s)_j v_j,
    lse = logaddexp(lse_A, lse_B),   o = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B.
So the paged store can attend block group by block group (resident, staged from RAM, read from disk)
and retrieval can attend to its retrieved keys and to the resident window separately.

Shape legend: B batch, H query heads, K key/value heads, G = H // K query heads per KV head,
T queries, S keys, D head dim.
"""

import torch

NEG_INF = float("-inf")


def causal_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, S] bool: query at position qpos[t] may see key at kpos[s] (causal, optionally within `window`)."""
    mask = kpos[None, :] <= qpos[:, None]
    if window is not None:
        mask &= kpos[None, :] > qpos[:, None] - window
    return mask


def partial_attention(q, k, v, scale: float, mask=None):
    """Softmax attention of q over one key set, with its log-sum-exp, in float32.

    Args:
        q: [B, H, T, D] queries.
        k, v: [B, K, S, D] keys and values (K divides H: GQA).
        mask: None, or bool [T, S] / [B, H, T, S] (True: may attend).
    Returns:
        (o [B, H, T, D] float32, lse [B, H, T] float32); a query that sees no key gets o = 0, lse = -inf.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = q.float().reshape(B, K, G * T, D)  # heads of one KV group side by side: [B, K, G*T, D]
    s = (qg @ k.float().transpose(-1, -2)).view(B, H, T, S) * scale  # [B, H, T, S]
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [B, H, T]
    p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])  # fully masked rows -> 0
    o = (p.view(B, K, G * T, S) @ v.float()).view(B, H, T, D)
    return o, lse


def partial_attention_gathered(q, k, v, scale: float, valid=None):
    """Like partial_attention, but each query head has its own keys (e.g. its retrieved top-k).

    Args:
        q: [B, H, T, D]; k, v: [B, H, S, D] per query head; valid: None or bool [B, H, S] (padding slots False).
    Returns:
        (o [B, H, T, D], lse [B, H, T]) in float32.
    """
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, T, S]
    if valid is not None:
        s = s.masked_fill(~valid[:, :, None, :], NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    return p @ v.float(), lse


def merge(o_a, lse_a, o_b, lse_b):
    """Combine two partial attentions over disjoint key sets into the attention over their union.

    Args:
        o_a, o_b: [..., D] partial outputs; lse_a, lse_b: [...] their log-sum-exps (-inf: empty set).
    Returns:
        (o [..., D], lse [...]).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.clamp_min(torch.finfo(lse.dtype).min)  # both empty: weights exp(-inf) = 0, not nan
    w_a, w_b = torch.exp(lse_a - safe), torch.exp(lse_b - safe)
    return o_a * w_a[..., None] + o_b * w_b[..., None], lse


class Accumulator:
    """Running merge of partial attentions (online softmax across key sets)."""

    def __init__(self):
        self.o = self.lse = None

    def add(self, o, lse):
        if self.o is None:
            self.o, self.lse = o, lse
        else:
            self.o, self.lse = merge(self.o, self.lse, o, lse)
