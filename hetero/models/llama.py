"""Llama 2/3, SmolLM2, Mistral and Qwen2 (the same decoder; Qwen2 adds q/k/v biases, Mistral a sliding window)."""

from ..config import ModelArgs
from ..errors import HeteroError
from .common import MLP, Attention, CausalLM, DecoderLayer

MODEL_TYPES = ("llama", "mistral", "qwen2")
EXPERT_PATTERN = None  # dense: no experts


def build(args: ModelArgs) -> CausalLM:
    qkv_bias = args.model_type == "qwen2" or args.attention_bias
    window = args.sliding_window if args.model_type == "mistral" else None
    if args.model_type == "qwen2" and args.use_sliding_window:
        raise HeteroError("config.json: use_sliding_window is true, and qwen2 with sliding-window attention is not supported yet")
    layers = [
        DecoderLayer(args, Attention(args, qkv_bias=qkv_bias, window=window),
                     MLP(args.hidden_size, args.intermediate_size, args.mlp_bias))
        for _ in range(args.num_hidden_layers)
    ]
    return CausalLM(args, layers)
