"""GGUF import against transformers' own GGUF loading (the real SmolLM2 file) and against the HF
models that tiny GGUFs written here come from (one per supported family, written the way llama.cpp's
converter writes them)."""

import json
import math
import re

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hetero.checkpoint.gguf import import_gguf
from hetero.errors import HeteroError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 12345 + 678 = 13023.",
    "def f(x):\n    return x ** 2  # square\n",
    "naïve café, 你好世界, emoji 🤖👍🏽 and ünïcödé",
    "multiple    spaces\t\ttabs\n\n\nnewlines  ",
    " leading space",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine, isn't it?",
    "",
]


# ---- the real SmolLM2 GGUF against transformers' GGUF loader ----


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_tensors_match_transformers(smollm2_dir, hf_gguf_model):
    ours = load_file(smollm2_dir / "model.safetensors")
    ref = hf_gguf_model.state_dict()
    assert "lm_head.weight" not in ours  # the GGUF has no output.weight: tied embeddings
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert (tensor - ref[name]).abs().max().item() <= 1e-6, name
    # Equal Q/K prove the un-permutation only if llama.cpp's row order differs from HF's here.
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(torch.from_numpy(_llamacpp_permute(q.numpy(), 9)), q)


def test_tokenizer_matches_transformers(smollm2_dir, hf_gguf_tokenizer):
    ours = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == hf_gguf_tokenizer(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1]


def test_logits_match_transformers(smollm2_dir, hf_gguf_model):
    tok = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = torch.tensor([tok.encode("<|im_start|>user\nName three colors.<|im_end|>\n").ids])
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ours(ids).logits - hf_gguf_model(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_config_files(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 100000.0)
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["add_bos_token"] is False and "<|im_start|>" in tok_config["chat_template"]
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def _error(path, tmp_path) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(HeteroError) as info:
        import_gguf(path, out)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_and_garbage_files(smollm2_gguf, tmp_path):
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "cut_header.gguf"
    cut.write_bytes(data[:100_000])  # inside the vocabulary
    assert "truncated" in _error(cut, tmp_path) and "header" in _error(cut, tmp_path)
    cut = tmp_path / "cut_data.gguf"
    cut.write_bytes(data[:-5000])  # inside the last tensor
    assert re.search(r"truncated.*tensor data", _error(cut, tmp_path))
    cut = tmp_path / "cut_tiny.gguf"
    cut.write_bytes(data[:10])
    assert "truncated" in _error(cut, tmp_path)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a GGUF file" in _error(garbage, tmp_path)
    garbage.write_bytes(b"GGUF" + np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert re.search("corrupt|truncated", _error(garbage, tmp_path))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "not a GGUF file" in _error(empty, tmp_path)
    assert "not found" in _error(tmp_path / "missing.gguf", tmp_path)


# ---- tiny GGUFs written here from random HF models, one per family ----

_GLOBAL = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
}
_EXPERT = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_GGUF_ARCH = {"llama": "llama", "llama3": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "qwen3_moe": "qwen3moe"}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
_WORDS = [" the", " hello", " world", " and", "ing", "er", " 12", "\n  ", " def", " return", " café"]


def _byte_symbols():
    """GPT-2's spelling of each byte as a printable character, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    chars = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [chars[b] for b in range(256)]


def _byte_vocab():
    """A small byte-level BPE vocabulary: the 256 byte symbols, merges spelling _WORDS, specials."""
    symbols = _byte_symbols()
    tokens, merges = list(symbols), []
    for word in _WORDS:
        spelled = "".join(symbols[b] for b in word.encode("utf-8"))
        for end in range(2, len(spelled) + 1):
            if spelled[:end] not in tokens:
                merges.append(f"{spelled[:end - 1]} {spelled[end - 1]}")
                tokens.append(spelled[:end])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]  # bos 1, eos 2
    return specials + tokens, [3, 3, 3, 4, 4] + [1] * len(tokens), merges


def _sp_vocab():
    """A small SentencePiece vocabulary: unk/bos/eos, 256 byte-fallback tokens, scored pieces."""
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = []
    for word in ["▁the", "▁hello", "▁world", "▁and", "ing", "er", "▁12", "▁def", "▁return", "▁café"]:
        for end in range(1, len(word) + 1):
            for piece in (word[:end], word[end - 1]):
                if piece not in pieces:
                    pieces.append(piece)
    return tokens + pieces, types + [1] * len(pieces), [0.0] * 259 + [-float(i) for i in range(len(pieces))]


def _tiny_model(kind, vocab_size):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2)
    t = transformers
    if kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0))
    elif kind == "llama3":
        config = t.LlamaConfig(**{**common, "max_position_embeddings": 131072}, tie_word_embeddings=True,
                               rope_parameters=_LLAMA3_ROPE)
        model = t.LlamaForCausalLM(config)
    elif kind == "mixtral":
        model = t.MixtralForCausalLM(t.MixtralConfig(**common, num_local_experts=3, num_experts_per_tok=2,
                                                     tie_word_embeddings=False, rope_theta=1e6))
    elif kind == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6))
    elif kind == "qwen3":
        model = t.Qwen3ForCausalLM(t.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rope_theta=1e6))
    else:
        config = t.Qwen3MoeConfig(**common, head_dim=32, moe_intermediate_size=48, num_experts=4,
                                  num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
        model = t.Qwen3MoeForCausalLM(config)
    for param in model.parameters():  # norms start at exactly 1; make them matter
        param.data.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def _llamacpp_permute(w, heads):
    """llama.cpp's convert_hf_to_gguf.py row order for Llama Q/K (interleaved rotary halves)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(kind, tmp_path):
    """Save a random HF model of this family, and a GGUF of it written as llama.cpp would."""
    sentencepiece = kind == "llama"
    tokens, types, extra = _sp_vocab() if sentencepiece else _byte_vocab()
    model = _tiny_model(kind, len(tokens))
    hf_dir = tmp_path / f"hf-{kind}"
    model.save_pretrained(hf_dir)
    weights = load_file(hf_dir / "model.safetensors")
    cfg, arch = model.config, _GGUF_ARCH[kind]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    writer = gguf.GGUFWriter(str(tmp_path / f"{kind}.gguf"), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if kind.startswith("qwen3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if kind in ("mixtral", "qwen3_moe"):
        experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if kind == "qwen3_moe":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre("default" if sentencepiece else {"llama3": "llama-bpe"}.get(kind, "qwen2"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
        writer.add_token_scores(extra)
    else:
        writer.add_token_merges(extra)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    stacked = {}
    for name, tensor in weights.items():
        w = tensor.numpy()
        if name in _GLOBAL:
            writer.add_tensor(_GLOBAL[name] + ".weight", w)
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:
            stacked.setdefault(f"blk.{m[1]}.ffn_{_EXPERT[m[3]]}_exps.weight", {})[int(m[2])] = w
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        part = _LAYER[m[2]]
        if kind in ("llama", "llama3", "mixtral") and part in ("attn_q", "attn_k"):
            w = _llamacpp_permute(w, cfg.num_attention_heads if part == "attn_q" else cfg.num_key_value_heads)
        writer.add_tensor(f"blk.{m[1]}.{part}.{m[3]}", np.ascontiguousarray(w))
    for name, per_expert in stacked.items():
        writer.add_tensor(name, np.stack([per_expert[e] for e in sorted(per_expert)]))
    if kind == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, weights, tmp_path / f"{kind}.gguf"


def _llama3_rope_factors(dim):
    """rope_freqs.weight as llama.cpp's converter computes it from a llama3 rope_scaling."""
    r = _LLAMA3_ROPE
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * r["rope_theta"] ** (i / dim)
        if wavelen < r["original_max_position_embeddings"] / r["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > r["original_max_position_embeddings"] / r["low_freq_factor"]:
            factors.append(r["factor"])
        else:
            smooth = (r["original_max_position_embeddings"] / wavelen - r["low_freq_factor"]) / (
                r["high_freq_factor"] - r["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / r["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def _import(gguf_path, out, **kwargs):
    out.mkdir()
    import_gguf(gguf_path, out, **kwargs)
    return out


def _logits(model, vocab_size):
    ids = (torch.arange(48) * 37 + 5).remainder(vocab_size)[None]  # long enough for rope scaling to show
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "llama3", "mixtral", "qwen2", "qwen3", "qwen3_moe"])
def test_tiny_family_matches_source_model(kind, tmp_path):
    model, weights, gguf_path = _write_tiny_gguf(kind, tmp_path)
    out = _import(gguf_path, tmp_path / "out")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(weights)
    for name, tensor in ours.items():
        assert torch.equal(tensor, weights[name]), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    vocab = model.config.vocab_size
    assert (_logits(loaded, vocab) - _logits(model, vocab)).abs().max().item() <= 1e-5


def test_multi_shard_bf16_and_progress(tmp_path):
    model, weights, gguf_path = _write_tiny_gguf("mixtral", tmp_path)
    calls = []
    out = _import(gguf_path, tmp_path / "out", dtype=torch.bfloat16, max_shard_bytes=40_000,
                  progress=lambda done, total: calls.append((done, total)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(weights) and set(index["weight_map"].values()) == {s.name for s in shards}
    assert calls == [(i + 1, len(weights)) for i in range(len(weights))]
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16 and index["weight_map"][name] == shard.name
                assert torch.equal(tensor, weights[name].to(torch.bfloat16)), name
                total += tensor.numel() * 2
        assert shard.stat().st_size < 40_000 + 4096  # payload cap plus the safetensors header
    assert index["metadata"]["total_size"] == total
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(loaded.state_dict()["lm_head.weight"], weights["lm_head.weight"].to(torch.bfloat16).float())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3"])
def test_tiny_tokenizers_match_transformers(kind, tmp_path):
    """SentencePiece (llama), byte-level with Qwen2's and Llama 3's split regexes, user-defined tokens."""
    _, _, gguf_path = _write_tiny_gguf(kind, tmp_path)
    out = _import(gguf_path, tmp_path / "out")
    ours = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    texts = TEXTS + ["hello the world and café", "<think>x</think> <s> the</s>", "  the  hello\n\n  world 1234"]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
    if kind == "llama":  # SentencePiece files add BOS by default, as the post-processor now says
        assert ours.encode("hello").ids[0] == 1 == ref("hello").input_ids[0]
    else:
        assert ours.encode("<think>").ids == [ours.token_to_id("<think>")]


def test_rejections(tmp_path, smollm2_gguf):
    _, _, gguf_path = _write_tiny_gguf("qwen2", tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(HeteroError, match="empty directory"):
        import_gguf(gguf_path, busy)
    # Rewrite the file's architecture name (same length, so offsets stay valid) to one we lack.
    data = gguf_path.read_bytes()
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(data.replace(b"\x05\x00\x00\x00\x00\x00\x00\x00qwen2", b"\x05\x00\x00\x00\x00\x00\x00\x00phi99", 1))
    (tmp_path / "out").mkdir()
    with pytest.raises(HeteroError, match="phi99.*supports llama, qwen2, qwen3, qwen3moe"):
        import_gguf(odd, tmp_path / "out")
    odd.write_bytes(data.replace(b"\x04\x00\x00\x00\x00\x00\x00\x00gpt2", b"\x04\x00\x00\x00\x00\x00\x00\x00bert", 1))
    (tmp_path / "out2").mkdir()
    with pytest.raises(HeteroError, match="'bert' tokenizer"):
        import_gguf(odd, tmp_path / "out2")
