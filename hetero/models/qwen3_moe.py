"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm), sparse layers without a shared expert, and
dense MLP layers where mlp_only_layers / decoder_sparse_step say so (the Qwen2-MoE rule).
"""

import re

from ..config import ModelArgs
from ..errors import HeteroError
from .common import MLP, Attention, CausalLM, DecoderLayer, SparseMoE
from .qwen2_moe import is_sparse

MODEL_TYPES = ("qwen3_moe",)
EXPERT_PATTERN = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
EXPERT_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def build(args: ModelArgs) -> CausalLM:
    if args.use_sliding_window:
        raise HeteroError(f"config.json: use_sliding_window is true, and {args.model_type} with sliding-window "
                          "attention is not supported")
    layers = []
    for i in range(args.num_hidden_layers):
        if is_sparse(args, i):
            ffn = SparseMoE(args, i, norm_topk=args.norm_topk_prob)
        else:
            ffn = MLP(args.hidden_size, args.intermediate_size)
        layers.append(DecoderLayer(args, Attention(args, qkv_bias=args.attention_bias, qk_norm="head"), ffn))
    return CausalLM(args, layers)
