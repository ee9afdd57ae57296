"""Computing the selected experts of one MoE layer wherever their weights live.

Shape legend: N tokens, C hidden, k experts per token.
"""

import torch

from ..models.common import expert_ffn


class ExpertDispatch:
    """The `experts` object injected into a SparseMoE block.

    After the router has chosen, the layer's experts are served by the executor's ExpertManager
    (experts/manager.py): resident, cached, prefetched, or brought in now; an expert the cost model
    leaves on the CPU (computing on the gpu) gets its tokens' hidden states there and gives its
    result back. Each expert is applied to all of its tokens at once, in ascending expert order,
    whatever was cached or predicted — so outputs never depend on prefetching.
    """

    def __init__(self, store, layer_idx: int, observers: list | None = None, manager=None):
        self.store, self.layer = store, layer_idx
        # callables observer(layer, x [N, C], idx [N, k], w [N, k]) told of every routing decision
        # (routing traces, prediction recall); shared by all layers of one executor
        self.observers = observers if observers is not None else []
        self.manager = manager

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, C], idx [N, k] expert ids, w [N, k] float32 routing weights -> [N, C]."""
        for observe in self.observers:
            observe(self.layer, x, idx, w)
        m = self.manager
        used = m.begin_layer(self.layer, idx, w)
        one = x.shape[0] == 1  # decoding: every expert takes the one token, nothing to gather or scatter
        if one:
            slot = {e: i for i, e in enumerate(idx[0].tolist())}
            counts = dict.fromkeys(used, 1)
        else:
            where = {e: torch.where(idx == e) for e in used}  # e -> (token [n], slot [n])
            counts = {e: len(where[e][0]) for e in used}
        m.prepare(self.layer, x, counts)
        out = torch.zeros_like(x)
        for e in used:
            if one:
                token, xs, ws = None, x, w[:, slot[e], None]  # [1, C], [1, 1]
            else:
                token, s = where[e]
                xs, ws = x[token], w[token, s, None]
            with m.serve(self.layer, e, counts[e]) as (tier, (gate, up, down)):
                if tier != m.compute:  # computed where its weights are: the CPU
                    xs, ws = xs.cpu(), ws.cpu()
                y = expert_ffn(xs, gate, up, down) * ws
            y = y.to(device=out.device, dtype=out.dtype)
            if one:
                out += y  # the sum index_add_ makes of a single row, in the same (ascending expert) order
            else:
                out.index_add_(0, token, y)
        return out
