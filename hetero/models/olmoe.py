"""OLMoE: an MoE block in every layer, q/k RMSNorm over the whole projection (before the heads are
split), and q/k/v clamped to [-clip_qkv, clip_qkv] when the config sets it.
"""

import re

from ..config import ModelArgs
from .common import Attention, CausalLM, DecoderLayer, SparseMoE

MODEL_TYPES = ("olmoe",)
EXPERT_PATTERN = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
EXPERT_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def build(args: ModelArgs) -> CausalLM:
    clip = args.raw.get("clip_qkv")
    layers = [
        DecoderLayer(args, Attention(args, qkv_bias=args.attention_bias, qk_norm="full", clip_qkv=clip),
                     SparseMoE(args, i, norm_topk=args.norm_topk_prob))
        for i in range(args.num_hidden_layers)
    ]
    return CausalLM(args, layers)
