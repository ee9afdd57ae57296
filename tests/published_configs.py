"""config.json of real models (the fields hetero reads, as published) with their parameter counts:
config-only directories for `hetero plan` in tests/test_plan_cli.py and benchmarks/plan_speed.py."""

# the published config.json values (the fields hetero reads)
CONFIGS = {
    "Mixtral-8x7B": (46.7e9, dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16")),
    "Qwen3-30B-A3B": (30.5e9, dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        use_sliding_window=False, torch_dtype="bfloat16")),
    "Llama-3-70B": (70.6e9, dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")),
    "Qwen3-235B-A22B": (235.1e9, dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=1536, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=40960, tie_word_embeddings=False, use_sliding_window=False, torch_dtype="bfloat16")),
}
