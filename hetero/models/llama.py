"""Llama 2/3, SmolLM2, Mistral and Qwen2 (the same decoder; Qwen2 adds q/k/v biases)."""

from ..config import ModelArgs
from .common import MLP, Attention, CausalLM, DecoderLayer

MODEL_TYPES = ("llama", "mistral", "qwen2")
EXPERT_PATTERN = None  # dense: no experts

def build(args: ModelArgs) -> CausalLM:
    qkv_bias = args.model_type == "qwen2" or args.attention_bias
    layers = [
        DecoderLayer(args, Attention(args, qkv_bias=qkv_bias), MLP(args.hidden_size, args.intermediate_size, args.mlp_bias))
        for _ in range(args.num_hidden_layers)
    ]
    return CausalLM(args, layers)
