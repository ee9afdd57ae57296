"""The fixed cost of a decode step through each family's own modules, measured at tiny sizes.

At one token per step the norms, RoPE, views, attention and routing of a layer move almost no data;
their time is Python and dispatch overhead that does not shrink with the weights. Running the very
modules the executor runs (models/*.py, experts/dispatch.py, kvstore/cache.py) with hidden size 64
measures it per family: per layer for attention and for a dense MLP, per MoE block and per expert
computed, and per step (embedding, RoPE tables, final norm, lm_head call).
"""

import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..config import ModelArgs
from ..experts.dispatch import ExpertDispatch
from ..kvstore.cache import LayerKV
from ..models import family_for, supported_model_types

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, num_experts=4,
            moe_intermediate_size=32, mlp_only_layers=[1], sliding_window=4096)
KV_TOKENS = (16, 80)  # the tiny cache is refilled between these lengths, so SDPA sees a short context


class _Owner:
    """What a kvstore.cache.LayerKV asks of its cache: a capacity and a place to account bytes (none here)."""

    max_tokens = KV_TOKENS[1] + 1

    def account(self, nbytes):
        pass


class _ResidentExperts:
    """Stands in for the executor's expert manager (experts/manager.py) with every expert resident on the
    compute device: the dispatch loop's calls, none of the moving."""

    compute = "resident"  # the tier the dispatch compares with: every expert computes where it is

    def __init__(self, weights):
        self.weights = weights

    def begin_layer(self, layer, idx, w):
        return torch.unique(idx).tolist()

    def prepare(self, layer, x, counts):
        pass

    @contextmanager
    def serve(self, layer, e, n):
        yield self.compute, self.weights[e]


def _materialise(model, device):
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.ones(p.shape) if "norm" in name or p.dim() == 1 else torch.randn(p.shape) * 0.02
                mod._parameters[name] = t.to(device)


def _build(model_type: str, top_k: int, device: str):
    args = ModelArgs.from_dict({**TINY, "model_type": model_type, "num_experts_per_tok": top_k})
    model = family_for(args).build(args)
    _materialise(model, device)
    C, I = args.hidden_size, args.moe_intermediate_size
    for block in model.moe_blocks():
        experts = [tuple(torch.randn(s, device=device) * 0.02 for s in ((I, C), (I, C), (C, I)))
                   for _ in range(args.num_experts)]
        resident = _ResidentExperts(experts)
        block.experts = ExpertDispatch(resident, block.layer_idx, manager=resident)
    return args, model


def _per_call(fn, device: str, calls: int) -> float:
    def batch():
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()

    batch()
    times = []
    for _ in range(12):  # the median of short batches: a typical step, as decoding is measured
        t0 = time.perf_counter()
        batch()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / calls


def _layer_parts(model_type: str, top_k: int, device: str, calls: int) -> dict:
    args, model = _build(model_type, top_k, device)
    owner = _Owner()
    cache = [LayerKV(owner) for _ in range(args.num_hidden_layers)]
    h = torch.randn(1, 1, args.hidden_size, device=device)
    out = {}

    def attn_step(layer, kv):
        if kv.length >= KV_TOKENS[1]:
            kv.length = KV_TOKENS[0]
        cos, sin = model.rotary(kv.length, 1, h.dtype, h.device)
        return h + layer.self_attn(layer.input_layernorm(h), cos, sin, kv)

    # prime each layer's cache with KV_TOKENS[0] tokens
    x = torch.randn(1, KV_TOKENS[0], args.hidden_size, device=device)
    cos, sin = model.rotary(0, KV_TOKENS[0], x.dtype, x.device)
    for j, layer in enumerate(model.model.layers):
        layer.self_attn(x, cos, sin, cache[j])
    out["attn"] = _per_call(lambda: attn_step(model.model.layers[0], cache[0]), device, calls)
    for layer in model.model.layers:
        ffn = getattr(layer, layer.ffn_name)
        kind = "moe" if ffn.__class__.__name__ == "SparseMoE" else "mlp"
        if kind not in out:
            out[kind] = _per_call(lambda: h + ffn(layer.post_attention_layernorm(h)), device, calls)
    if "step" not in out:
        ids = torch.tensor([[3]], device=device)
        emb = torch.randn(args.vocab_size, args.hidden_size, device=device) * 0.02

        def step():
            x = F.embedding(ids, emb)
            model.rotary(KV_TOKENS[0], 1, x.dtype, x.device)
            return F.linear(model.model.norm(x)[:, -1:], emb)[:, -1].float().cpu()

        out["step"] = _per_call(step, device, calls)
    return out


def measure(device: str, quick: bool, model_types=None) -> dict:
    """Overhead seconds per model_type: {"attn", "mlp"?, "moe"?, "expert"?, "step"} on `device`.

    "moe" is the MoE block without its experts (router, shared expert, dispatch loop); "expert" is
    what each expert computed adds on top of its weights' arithmetic.
    """
    calls = 4 if quick else 16
    threads = torch.get_num_threads()
    # one thread: at these sizes nothing is worth parallelising, and on a busy machine a parallel
    # region waits for a descheduled worker (a scheduler tick, ~10 ms) — noise, not overhead
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = _measure_all(device, calls, model_types or supported_model_types())
    finally:
        torch.set_num_threads(threads)
    return out


def _measure_all(device: str, calls: int, model_types) -> dict:
    out = {}
    for mt in model_types:
        one = _layer_parts(mt, 1, device, calls)
        row = {k: one[k] for k in ("attn", "mlp", "step") if k in one}
        if "moe" in one:
            # all the tiny model's experts against one: a difference of one expert's few microseconds
            # drowned in the timings' noise, and came out as zero for most families
            every = TINY["num_experts"]
            expert = max(0.0, _layer_parts(mt, every, device, calls)["moe"] - one["moe"]) / (every - 1)
            row.update(moe=max(0.0, one["moe"] - expert), expert=expert)
        out[mt] = row
    return out
