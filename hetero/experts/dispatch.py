"""Computing the selected experts of one MoE layer wherever their weights live.

Shape legend: N tokens, C hidden, k experts per token.
"""

import torch

from ..models.common import expert_ffn


class ExpertDispatch:
    """The `experts` object injected into a SparseMoE block.

    Each expert that any token picked is brought to the compute device once (if it is not there
    already), applied to all of its tokens, and released before the next one, so at most one
    off-device expert is held at a time.
    """

    def __init__(self, store, layer_idx: int):
        self.store, self.layer = store, layer_idx

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, C], idx [N, k] expert ids, w [N, k] float32 routing weights -> [N, C]."""
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            token, slot = torch.where(idx == e)
            with self.store.expert(self.layer, e) as (gate, up, down):
                y = expert_ffn(x[token], gate, up, down) * w[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
