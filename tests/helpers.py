"""Shared test helpers: tiny random checkpoints written by transformers, and hand-made plans.

Nothing here downloads anything: every model is built from a config with random weights.
"""

import itertools
import json
import threading
from pathlib import Path

import torch

from hetero.api import checkpoint_tensors
from hetero.checkpoint.catalogue import Catalogue
from hetero.config import ModelArgs
from hetero.flash import pack as packs
from hetero.models import family_for
from hetero.placement.groups import make_groups
from hetero.placement.plan import Plan, tier_usage

VOCAB = 300
EOS = VOCAB - 1  # inside the vocabulary, so min_new_tokens has something to suppress

# small enough to run in milliseconds, big enough for GQA (4 query / 2 kv heads) and top-2 of 4-8 experts
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
    tie_word_embeddings=False,
)

# one config per family, each exercising what makes that family different
FAMILIES = {
    "llama": dict(
        model_type="llama", num_hidden_layers=3, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "mistral": dict(model_type="mistral", tie_word_embeddings=True, head_dim=32),
    "qwen2": dict(
        model_type="qwen2",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64},
    ),
    "qwen3": dict(model_type="qwen3", head_dim=16, attention_bias=True, tie_word_embeddings=True),
    "mixtral": dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        model_type="qwen2_moe", num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        head_dim=16, decoder_sparse_step=2, norm_topk_prob=True,
    ),
    "olmoe": dict(model_type="olmoe", num_experts=8, num_experts_per_tok=2, clip_qkv=1.5, norm_topk_prob=False),
}


def _randomize(model: torch.nn.Module, std: float = 0.08):
    """Random weights everywhere (transformers initialises biases to 0 and norms to 1, which hides mix-ups)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)


def tiny_checkpoint(tmp_path: Path, family: str, seed: int = 0, **overrides):
    """Build a tiny random `family` model with transformers, save it, and return (dir, hf_model).

    Args:
        tmp_path: a directory to write into (a subdirectory named after the family is made).
        family: a key of FAMILIES.
        overrides: config fields to change.
    Returns:
        (the checkpoint directory, the transformers model in eval mode, float32).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**BASE, **FAMILIES[family], **overrides}
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    out = Path(tmp_path) / family
    model.save_pretrained(out)
    return out, model


def edit_config(model_dir: Path, **changes):
    """Rewrite fields of a checkpoint's config.json in place."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def model_groups(model_dir: Path, dtype: torch.dtype = torch.float32):
    """(ModelArgs, groups in execution order) of a checkpoint, as load_offloaded computes them."""
    args = ModelArgs.from_dir(model_dir)
    fam = family_for(args)
    cat = Catalogue(model_dir)
    try:
        groups = make_groups(checkpoint_tensors(args, cat), getattr(fam, "EXPERT_PATTERN", None), dtype)
    finally:
        cat.close()
    return args, groups


def spread_plan(model_dir: Path, cycle, compute: str = "cpu", norms: str | None = None, kv_tokens: int = 128,
                dtype: torch.dtype = torch.float32, budgets="exact", pack: str | None = None) -> Plan:
    """A hand-made Plan placing the groups (norms excepted) on the tiers of `cycle`, round robin.

    Args:
        cycle: tiers to deal the groups out to in execution order, e.g. ("disk", "cpu").
        compute: "cpu" or "gpu".
        norms: the tier of the norms group (default: the compute tier).
        budgets: "exact" for budgets equal to what the plan commits per tier (weights + staging + KV),
            so that any byte the runtime holds beyond its promise fails the load or the run; or a dict.
        pack: the pack dtype disk-tier groups will be read from (its layout sets the staging), as
            load_offloaded(pack=...); default one in the compute dtype.
    """
    args, groups = model_groups(model_dir, dtype)
    deal = itertools.cycle(cycle)
    tiers = {g.name: (norms or compute) if g.kind == "norms" else next(deal) for g in groups}
    plan = Plan(tiers=tiers, compute=compute, budgets={}, kv_tokens=kv_tokens)
    if budgets == "exact":
        extents = None
        if pack is not None:
            cat = Catalogue(model_dir)
            fmt = packs.PackFormat.parse(pack)
            tensors = checkpoint_tensors(args, cat)
            codecs = packs.codec_stats(cat, tensors, groups, fmt) if fmt.codec else None  # the exact sizes
            extents = packs.staging_extents(packs.layout(tensors, groups, fmt, codecs), dtype)
            cat.close()
        use = tier_usage(groups, plan, args, dtype, extents)
        budgets = {t: sum(use[t].values()) for t in (("gpu", "cpu") if compute == "gpu" else ("cpu",))}
    return Plan(tiers=tiers, compute=compute, budgets=dict(budgets), kv_tokens=kv_tokens)


def over_budget(model) -> list[str]:
    """The tiers of a loaded OffloadedModel whose accountant peak went past their budget (empty when all fit)."""
    over = []
    for tier, s in model.accountant.snapshot().items():
        if s["budget_bytes"] is not None and s["peak_bytes"] > s["budget_bytes"]:
            over.append(f"{tier}: peak {s['peak_bytes']} > budget {s['budget_bytes']}")
    return over


def generate_in_thread(model, timeout: float = 120) -> dict:
    """Run a short generate on a daemon thread: {"hung": still running after `timeout`, "error": what it raised}."""
    result = {}

    def run():
        try:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
        except BaseException as e:  # noqa: BLE001 — the test inspects whatever surfaced
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=timeout)
    result["hung"] = t.is_alive()
    return result
