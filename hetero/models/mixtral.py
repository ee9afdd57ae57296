"""Mixtral: the Mistral decoder with a top-k sparse MoE block in every layer (no shared expert).

Checkpoint names (what `save_pretrained` writes, also with transformers 5, which fuses the experts
only in memory): `model.layers.L.block_sparse_moe.gate.weight` for the router and
`model.layers.L.block_sparse_moe.experts.E.w1|w2|w3.weight` for the experts.
"""

import re

from ..config import ModelArgs
from .common import Attention, CausalLM, DecoderLayer, SparseMoE

MODEL_TYPES = ("mixtral",)
EXPERT_PATTERN = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
EXPERT_ROLES = {"w1": "gate", "w3": "up", "w2": "down"}


def build(args: ModelArgs) -> CausalLM:
    # Mixtral always renormalises its top-k routing weights and has no projection biases
    layers = [
        DecoderLayer(args, Attention(args, o_bias=False, window=args.sliding_window), SparseMoE(args, i, norm_topk=True),
                     ffn_name="block_sparse_moe")
        for i in range(args.num_hidden_layers)
    ]
    return CausalLM(args, layers)
