"""THE loop: run the model layer by layer, bringing each layer's weights to the compute device.

    embed -> for each layer j:
                 issue reads for j..j+depth      (disk -> host staging, on the reader's threads;
                                                  layers with nothing to read are skipped over)
                 copy j+1 to the device          (computing on the gpu)
                 take j, compute j, release j    (j's reads waited for only if they are late; an MoE
                                                  layer's experts come from experts/manager.py, which
                                                  prefetches the predicted experts of j+1..j+L)
          -> issue the next token's first reads -> final norm -> lm_head (streamed in slices
             when off-device)

Shape legend: B batch, T new tokens, C hidden size, V vocabulary.
"""

import time

import torch

from ..experts.dispatch import ExpertDispatch
from ..experts.manager import ExpertManager
from ..flash.pack import staging_extents
from ..kvstore.cache import KVCache
from ..placement.plan import expert_slot_bytes


class Executor:
    """Args:
        model: the family's CausalLM (meta weights, bound by `store`).
        store: runtime.weights.WeightStore (its `pipe` is the prefetch pipeline this loop drives).
        plan: the Plan being run (plan.depth: layers read ahead).
        device: runtime.device.Device.
        accountant: runtime.memory.Accountant.
        kv_cache: a callable making a fresh KV cache per sequence (kvstore paged / retrieval); default
            the contiguous KVCache of plan.kv_tokens.
        experts: the experts.manager.ExpertManager serving MoE layers (caches, prefetch, miss decisions);
            default one with the plan's expert caches, LRU, no prediction.
    """

    def __init__(self, model, store, plan, device, accountant, kv_cache=None, experts=None):
        self.model, self.store, self.plan = model, store, plan
        self.kv_cache = kv_cache
        self.device, self.acc = device, accountant
        self.routing_observers = []  # see ExpertDispatch.observers
        if experts is None and model.moe_blocks():
            extents = staging_extents(store.pack.extents, store.dtype) if store.pack else None
            experts = ExpertManager(store, expert_slot_bytes(list(store.groups.values()), extents), "lru", prefetch=False)
        self.experts = experts
        for block in model.moe_blocks():
            block.experts = ExpertDispatch(store, block.layer_idx, self.routing_observers, experts)
        self.timing = {f"{phase}_{what}": 0 for phase in ("prefill", "decode")
                       for what in ("s", "tokens", *store.io)}

    def new_cache(self) -> KVCache:
        if self.kv_cache is not None:
            return self.kv_cache()
        return KVCache(len(self.model.model.layers), self.plan.kv_tokens, self.acc, self.plan.compute)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Run new tokens through the model, appending their K/V to `cache`.

        Args:
            input_ids: [B, T] token ids.
            cache: the sequence's KV cache (its length is the position of the first new token).
            last_only: return logits for the last position only ([B, 1, V]) — all a sampler needs.
        Returns:
            logits [B, T, V] (or [B, 1, V]) in the compute dtype, on the compute device.
        """
        t0 = time.perf_counter()
        io0 = dict(self.store.io)
        B, T = input_ids.shape
        pipe = self.store.pipe
        try:
            pipe.issue(0)  # usually queued by the previous token already
            h = self.store.embed(input_ids)  # [B, T, C]
            cos, sin = self.model.rotary(cache.length, T, h.dtype, h.device)
            for j, layer in enumerate(self.model.model.layers):
                pipe.issue(j)  # reads for the next depth + 1 reading layers, into bounded host buffers
                pipe.copy(j + 1)  # j+1 onto the device (gpu compute only)
                bound = self.store.bind(pipe.take(j))  # j's weights; waits only if its reads are late
                h = layer(h, cos, sin, cache[j])  # an MoE layer's experts: experts.serve, prefetching j+1..j+L
                self.store.unbind(bound)
                pipe.release(j)  # compute is synchronous (or stream-ordered on cuda): j's buffers are free
            pipe.issue_next()  # the next token's first reads run while lm_head streams
            h = self.model.model.norm(h)
            if last_only:
                # fresh strides: a [B, 1, C] view keeps the [B, T, C] row stride, and torch's CPU linear
                # then copies the whole weight (lm_head: +200 MB and 60x the time, measured at T=8)
                h = h[:, -1:].clone(memory_format=torch.contiguous_format)
            logits = self.store.logits(h)
            if self.experts is not None:
                self.experts.end_step(B * T)  # one token step: cache scores decay
        except BaseException:
            pipe.abort()  # wait for reads in flight, then free every staging buffer
            if self.experts is not None:
                self.experts.abort()  # the same for expert reads filling cache slots
            raise
        self.device.synchronize()
        phase = "decode" if T == 1 and cache.length > 1 else "prefill"
        self.timing[f"{phase}_s"] += time.perf_counter() - t0
        self.timing[f"{phase}_tokens"] += B * T
        for k, v in self.store.io.items():
            self.timing[f"{phase}_{k}"] += v - io0[k]
        return logits
