"""THE loop: run the model layer by layer, bringing each layer's weights to the compute device.

    embed -> for each layer j: bind j's weights (resident, or fetched to staging), compute j,
    release j -> final norm -> lm_head (streamed in vocabulary slices when off-device)

Shape legend: B batch, T new tokens, C hidden size, V vocabulary.
"""

import time

import torch

from ..experts.dispatch import ExpertDispatch
from ..kvstore.cache import KVCache


class Executor:
    """Args:
        model: the family's CausalLM (meta weights, bound by `store`).
        store: runtime.weights.WeightStore.
        plan: the Plan being run.
        device: runtime.device.Device.
        accountant: runtime.memory.Accountant.
    """

    def __init__(self, model, store, plan, device, accountant):
        self.model, self.store, self.plan = model, store, plan
        self.device, self.acc = device, accountant
        for block in model.moe_blocks():
            block.experts = ExpertDispatch(store, block.layer_idx)
        self.timing = {f"{phase}_{what}": 0 for phase in ("prefill", "decode")
                       for what in ("s", "tokens", "disk_read_bytes", "host_to_device_bytes")}

    def new_cache(self) -> KVCache:
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
        h = self.store.embed(input_ids)  # [B, T, C]
        cos, sin = self.model.rotary(cache.length, T, h.dtype, h.device)
        for j, layer in enumerate(self.model.model.layers):
            with self.store.layer(j):
                h = layer(h, cos, sin, cache[j])
        h = self.model.model.norm(h)
        if last_only:
            h = h[:, -1:]
        logits = self.store.logits(h)
        self.device.synchronize()
        phase = "decode" if T == 1 and cache.length > 1 else "prefill"
        self.timing[f"{phase}_s"] += time.perf_counter() - t0
        self.timing[f"{phase}_tokens"] += B * T
        for k, v in self.store.io.items():
            self.timing[f"{phase}_{k}"] += v - io0[k]
        return logits
