"""A contiguous KV cache per layer on the compute tier, sized and accounted when a sequence starts.

Like llama.cpp's n_ctx, the whole reservation is taken at the first token: what the plan promised
is what is held, and decoding never stops halfway to grow a buffer.
Shape legend: B batch, K key/value heads, S tokens cached, D head dim.
"""

import torch
import torch.nn.functional as F

from ..errors import HeteroError


class LayerKV:
    def __init__(self, owner: "KVCache"):
        self.owner = owner
        self.k = self.v = None  # [B, K, capacity, D]
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add k/v [B, K, T, D]; return views of everything cached [B, K, S, D]."""
        B, T = k.shape[0], k.shape[2]
        need = self.length + T
        if self.k is None:
            cap = self.owner.max_tokens // B
            shape = (B, k.shape[1], cap, k.shape[3])
            self.owner.account(2 * k.new_empty(0).element_size() * B * k.shape[1] * cap * k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        if need > self.k.shape[2]:
            raise HeteroError(
                f"context of {need} tokens exceeds the KV cache this plan reserved ({self.k.shape[2]} tokens per "
                "sequence); start a new conversation (/clear) or load with a larger context or budget"
            )
        self.k[:, :, self.length:need] = k
        self.v[:, :, self.length:need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def attend(self, q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
        """Cache the new k/v [B, K, T, D] and attend the queries q [B, H, T, D] to everything cached.

        Args:
            scale: softmax scale (usually D ** -0.5).
            window: sliding-window size (a query sees only the last `window` keys), or None.
        Returns:
            [B, H, T, D] attention output.
        """
        past = self.length
        k, v = self.append(k, v)  # [B, K, S, D]
        return dense_attention(q, k, v, past, scale, window)


def dense_attention(q, k, v, past: int, scale: float, window: int | None = None) -> torch.Tensor:
    """SDPA of the new queries q [B, H, T, D] (positions past..past+T-1) over keys k, v [B, K, S, D] (positions 0..S-1)."""
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    mask, causal = None, T > 1
    if (T > 1 and past > 0) or (window is not None and S > window):
        # new token i sits at position past+i: it sees the cached keys and the new ones up to itself
        # (and, with a sliding window, none older than window-1 positions back)
        qpos = torch.arange(past, S, device=q.device)[:, None]
        kpos = torch.arange(S, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != H
    )  # [B, H, T, D]


class KVCache:
    """One LayerKV per decoder layer, on the compute tier.

    Args:
        max_tokens: tokens reserved in total (shared by the sequences of a batch).
    """

    def __init__(self, n_layers: int, max_tokens: int, accountant, tier: str):
        self.max_tokens = max_tokens
        self.accountant, self.tier = accountant, tier
        self.layers = [LayerKV(self) for _ in range(n_layers)]
        self.bytes = 0

    def account(self, nbytes: int):
        self.accountant.reserve(self.tier, nbytes, "kv")
        self.bytes += nbytes

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def free(self):
        """Drop the cache and give its bytes back."""
        self.accountant.release(self.tier, self.bytes, "kv")
        self.bytes = 0
        for layer in self.layers:
            layer.k = layer.v = None
            layer.length = 0
