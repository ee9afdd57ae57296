"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases), sparse layers with a
sigmoid-gated shared expert, and dense MLP layers where mlp_only_layers / decoder_sparse_step say so.
"""

import re

from ..config import ModelArgs
from ..errors import HeteroError
from .common import MLP, Attention, CausalLM, DecoderLayer, SparseMoE

MODEL_TYPES = ("qwen2_moe",)
EXPERT_PATTERN = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
EXPERT_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def is_sparse(args: ModelArgs, layer: int) -> bool:
    """Whether layer `layer` has an MoE block (else a dense MLP of intermediate_size), as transformers decides."""
    return layer not in args.mlp_only_layers and bool(args.num_experts) and (layer + 1) % args.decoder_sparse_step == 0


def build(args: ModelArgs) -> CausalLM:
    if args.use_sliding_window:
        raise HeteroError(f"config.json: use_sliding_window is true, and {args.model_type} with sliding-window "
                          "attention is not supported")
    # qkv_bias is absent from configs written before transformers 5, where the biases were always there
    qkv_bias = args.raw.get("qkv_bias", True)
    layers = []
    for i in range(args.num_hidden_layers):
        if is_sparse(args, i):
            ffn = SparseMoE(args, i, norm_topk=args.norm_topk_prob, shared_I=args.shared_expert_intermediate_size)
        else:
            ffn = MLP(args.hidden_size, args.intermediate_size)
        layers.append(DecoderLayer(args, Attention(args, qkv_bias=qkv_bias, o_bias=False), ffn))
    return CausalLM(args, layers)
