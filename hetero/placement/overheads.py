"""The fixed cost of a decode step through each family's own code, measured by running it on a tiny checkpoint.

At one token per step the norms, RoPE, views, attention and routing of a layer, and the executor's
own loop around it, move almost no data: their time is Python and dispatch overhead that does not
shrink with the weights. For each family this writes a tiny random checkpoint (hidden size 64),
loads it with the runtime itself (load_offloaded, everything in RAM: the same executor, expert
manager and KV cache a real model runs with) and times decode steps. Every matrix product is
replaced by a stand-in matvec of a real model's size, whose time is left out: the cost model
charges the real ones from their bytes and a fixed cost per call (probes.matvec, matvec_call), and
the stand-ins leave the caches as cold for the small ops in between as real weights do (those ops
run markedly slower between real matvecs than with none). Out come per-layer seconds for
attention (with the layer's norms and the executor's per-layer work) and for a dense MLP, per MoE
block and per expert computed, per MoE layer behind an expert cache, and per step (embedding,
final norm, the lm_head call, bookkeeping).

Timing the modules alone, outside the executor and with tiny matvecs, had given about a third of
what real decoding spends beside its matvecs (benchmarks/plan_drift.py splits the two).
"""

import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import ModelArgs
from ..models import common, family_for, supported_model_types
from .probes import pool_bytes

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, num_experts=16,
            moe_intermediate_size=32, mlp_only_layers=[1], sliding_window=4096, tie_word_embeddings=False)
KV_TOKENS = (16, 80)  # the cache is refilled between these lengths, so attention sees a short context
DEPTHS = (1, 4)  # layers of the two checkpoints whose difference is the per-layer cost
# the deep checkpoints route top-4 of 16 and the managed one predicts MAX_LOOKAHEAD layers ahead, as the
# fine-grained MoEs that get offloaded do: the manager's work per layer grows with the experts it
# tracks and predicts (a top-1-of-4, 1-ahead probe measured a quarter of what the trained fixture spends)
DEEP_TOP_K = 4


STAND_IN_BYTES = 4 * 2**20  # each stand-in matvec: past a core's L2, like most weight matrices


class _StandIns:
    """Replaces models.common.linear: each call runs a matvec over the next of a pool of STAND_IN_BYTES
    matrices (larger than the caches, as decoding streams its weights) and returns zeros of the real
    output's shape. `spent` is the seconds spent inside, to be taken out of every timing."""

    def __init__(self, device: str):
        self.device = device
        cols = 1024
        rows = STAND_IN_BYTES // (4 * cols)
        n = max(2, pool_bytes(device, True) // STAND_IN_BYTES)
        self.pool = [torch.full((rows, cols), 0.01, device=device) for _ in range(n)]
        self.x = torch.full((cols,), 0.01, device=device)
        self.i, self.spent = 0, 0.0

    def __call__(self, x, weight, bias=None):
        t0 = time.perf_counter()
        self.i = (self.i + 1) % len(self.pool)
        torch.mv(self.pool[self.i], self.x)
        if self.device == "cuda":
            torch.cuda.synchronize()
        out = x.new_zeros((*x.shape[:-1], weight.shape[0]))
        self.spent += time.perf_counter() - t0
        return out


@contextmanager
def _stand_ins(device: str):
    real, stand = common.linear, _StandIns(device)
    common.linear = stand
    try:
        yield stand
    finally:
        common.linear = real


def _write_checkpoint(out: Path, model_type: str, layers: int, top_k: int):
    """config.json and one safetensors file of a random tiny model of this family."""
    from safetensors.torch import save_file

    cfg = {**TINY, "model_type": model_type, "num_hidden_layers": layers, "num_experts_per_tok": top_k}
    args = ModelArgs.from_dict(cfg)
    family = family_for(args)
    model = family.build(args)
    gen = torch.Generator().manual_seed(0)

    def rand(shape, name):
        if "norm" in name or len(shape) == 1:
            return torch.ones(shape)
        return torch.randn(shape, generator=gen) * 0.02

    tensors = {n: rand(tuple(p.shape), n) for n, p in model.named_parameters()}
    C, I = args.hidden_size, args.moe_intermediate_size
    shapes = {"gate": (I, C), "up": (I, C), "down": (C, I)}
    for path, mod in model.named_modules():
        if isinstance(mod, common.SparseMoE):
            for e in range(args.num_experts):
                for key, role in family.EXPERT_ROLES.items():
                    name = f"{path}.experts.{e}.{key}.weight"
                    assert family.EXPERT_PATTERN.fullmatch(name), name  # the family's own naming
                    tensors[name] = rand(shapes[role], name)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))


def _timed(fn, into: list, stand: _StandIns):
    """fn, adding to into[0] the seconds each call takes beside the stand-in matvecs inside it."""
    def run(*a, **k):
        t0, s0 = time.perf_counter(), stand.spent
        try:
            return fn(*a, **k)
        finally:
            into[0] += time.perf_counter() - t0 - (stand.spent - s0)
    return run


class _Checkpoint:
    """A tiny checkpoint of one family written to `folder`, loaded (all in RAM) and ready to decode."""

    def __init__(self, model_type: str, layers: int, top_k: int, device: str, folder: Path, stand: _StandIns,
                 managed: bool = False):
        """managed: experts homed on disk behind a cpu expert cache, prefetching MAX_LOOKAHEAD layers ahead
        (the routing always picks the same experts here, so they stay cached: the manager's bookkeeping
        and prediction, no reads)."""
        import warnings
        from dataclasses import replace

        from ..api import load_offloaded
        from ..experts.predictor import SpeculativeGating
        from .plan import MAX_LOOKAHEAD

        path = folder / f"{model_type}-{layers}-{top_k}"
        if not (path / "config.json").is_file():
            _write_checkpoint(path, model_type, layers, top_k)
        kw = dict(device=device, dtype="float32", planner="greedy", ram=2**30, context=256, log_fn=lambda *_: None)
        self.ex = load_offloaded(path, **kw).executor
        if managed:
            plan = self.ex.plan
            groups = self.ex.store.groups
            tiers = {g: ("disk" if groups[g].kind == "expert" else t) for g, t in plan.tiers.items()}
            plan = replace(plan, tiers=tiers, expert_cache={plan.compute: 2 * TINY["num_experts"]})
            self.ex.store.cat.close()
            with warnings.catch_warnings():  # a temporary directory on tmpfs has no O_DIRECT: said for it only
                warnings.simplefilter("ignore", RuntimeWarning)
                self.ex = load_offloaded(path, plan=plan, **kw).executor
            m = self.ex.experts  # loaded without a profile, it looks 1 layer ahead
            m.lookahead, m.predictor = MAX_LOOKAHEAD, SpeculativeGating(m.predictor.routers, top_k, MAX_LOOKAHEAD)
        self.device, self.stand, self.cache = device, stand, None
        self.ffn = {}  # kind -> [seconds in this step, blocks]
        for layer in self.ex.model.model.layers:
            mod = getattr(layer, layer.ffn_name)
            slot = self.ffn.setdefault("moe" if isinstance(mod, common.SparseMoE) else "mlp", [0.0, 0])
            slot[1] += 1
            mod.forward = _timed(mod.forward, slot, stand)

    def step(self, i: int) -> tuple[float, dict]:
        """One decode step: (its seconds beside the stand-ins and the FFN blocks, {kind: seconds per block})."""
        if self.cache is None or self.cache.length >= KV_TOKENS[1]:
            if self.cache is not None:
                self.cache.free()
            self.cache = self.ex.new_cache()
            self.ex.forward(torch.arange(KV_TOKENS[0])[None], self.cache, last_only=True)
        for slot in self.ffn.values():
            slot[0] = 0.0
        t0, s0 = time.perf_counter(), self.stand.spent
        self.ex.forward(torch.tensor([[3 + i % 100]]), self.cache, last_only=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        blocks = sum(s for s, _ in self.ffn.values())
        return time.perf_counter() - t0 - (self.stand.spent - s0) - blocks, {k: s / n for k, (s, n) in self.ffn.items()}

    def close(self):
        import os

        if self.cache is not None:
            self.cache.free()
        store = self.ex.store
        store.cat.close()
        if store.reader is not None:  # the managed run reads its pack: its reader threads and file
            store.reader.close()
            os.close(store.pack_fd)
            store.pack.close()


def measure(device: str, quick: bool, model_types=None) -> dict:
    """Overhead seconds per model_type: {"attn", "mlp"?, "moe"?, "expert"?, "cached_moe"?, "step"} on `device`.

    "attn" is a layer's attention with everything of the layer that is not its MLP or MoE block (its
    norms, residual adds, the executor's per-layer work); "moe" is the MoE block without its experts
    (router, shared expert, dispatch loop, expert manager); "expert" is what each expert computed
    adds on top of its weights' arithmetic; "cached_moe" is what an MoE layer adds when its experts
    are homed below the compute tier behind an expert cache (the manager's cache bookkeeping and
    routing prediction, reads aside); "step" is the per-token rest.
    """
    steps = 12 if quick else 14
    threads = torch.get_num_threads()
    # one thread: at these sizes nothing is worth parallelising, and on a busy machine a parallel
    # region waits for a descheduled worker (a scheduler tick, ~10 ms) — noise, not overhead
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(), _stand_ins(device) as stand, \
                tempfile.TemporaryDirectory(prefix="hetero-overheads-") as d:
            return {mt: _family(mt, device, steps, Path(d), stand) for mt in (model_types or supported_model_types())}
    finally:
        torch.set_num_threads(threads)


def _family(model_type: str, device: str, steps: int, folder: Path, stand: _StandIns) -> dict:
    """One family's row. Its checkpoints run a step each in turn, and each turn's figures are
    differenced within the turn (then the median taken): the host's speed drifts between turns."""
    short, deep = DEPTHS
    every = TINY["num_experts"]
    runs = [_Checkpoint(model_type, short, 1, device, folder, stand),
            _Checkpoint(model_type, deep, DEEP_TOP_K, device, folder, stand)]
    if runs[0].ffn.get("moe"):
        runs.append(_Checkpoint(model_type, short, every, device, folder, stand))  # every expert computed
        runs.append(_Checkpoint(model_type, deep, DEEP_TOP_K, device, folder, stand, managed=True))
    try:
        turns = [[r.step(i) for r in runs] for i in range(steps + 2)][2:]  # two turns warm up
    finally:
        for r in runs:
            r.close()
    med = statistics.median
    # beside its FFN block, a layer costs its attention, norms, residual adds and the executor's
    # per-layer work: the difference per layer between the two depths; the remainder is per step
    per_layer = [(t[1][0] - t[0][0]) / (deep - short) for t in turns]
    row = {"attn": max(0.0, med(per_layer)), "step": max(0.0, med(t[0][0] - short * a for t, a in zip(turns, per_layer)))}
    if "mlp" in runs[1].ffn:
        row["mlp"] = med(t[1][1]["mlp"] for t in turns)
    if len(runs) > 2:
        # all the tiny model's experts against one: a difference of one expert's few microseconds
        # drowned in the timings' noise, and came out as zero for most families
        expert = max(0.0, med((t[2][1]["moe"] - t[0][1]["moe"]) / (every - 1) for t in turns))
        row.update(moe=max(0.0, med(t[0][1]["moe"] for t in turns) - expert), expert=expert)
        # what an MoE layer adds when its experts sit behind a cache and are predicted ahead
        n_moe = runs[1].ffn["moe"][1]
        row["cached_moe"] = max(0.0, med((t[3][0] + t[3][1]["moe"] * n_moe - t[1][0] - t[1][1]["moe"] * n_moe) / n_moe
                                         for t in turns))
    return row
