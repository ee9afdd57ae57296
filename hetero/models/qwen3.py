"""Qwen3 (dense): the Llama decoder with an RMSNorm over each query / key head before RoPE."""

from ..config import ModelArgs
from ..errors import HeteroError
from .common import MLP, Attention, CausalLM, DecoderLayer

MODEL_TYPES = ("qwen3",)
EXPERT_PATTERN = None  # dense: no experts


def build(args: ModelArgs) -> CausalLM:
    if args.use_sliding_window:
        raise HeteroError(f"config.json: use_sliding_window is true, and {args.model_type} with sliding-window "
                          "attention is not supported")
    # attention_bias puts a bias on q, k, v and o alike (o follows the config by default)
    layers = [
        DecoderLayer(args, Attention(args, qkv_bias=args.attention_bias, qk_norm="head"),
                     MLP(args.hidden_size, args.intermediate_size))
        for _ in range(args.num_hidden_layers)
    ]
    return CausalLM(args, layers)
