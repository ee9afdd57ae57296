"""Import a GGUF file (llama.cpp's single-file format) as an HF-style checkpoint directory.

A GGUF holds (usually quantized) tensors under llama.cpp's names, and the model config and the
tokenizer as metadata under llama.cpp's keys. The rest of hetero reads safetensors + config.json +
tokenizer.json with HF names, so importing means: dequantize every tensor, rename it (undoing
llama.cpp's rope row order on Llama Q/K and splitting stacked MoE experts), and rebuild the JSON
files from the metadata. Only `gguf.GGUFReader` parses the file; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from hetero.checkpoint.gguf_tokenizer import build_tokenizer
from hetero.errors import HeteroError

# HF safetensors shards are capped at a few GB; 2 GB keeps one shard's worth of float32 in memory.
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9

# GGUF `general.architecture` -> how we import it. `llama` with experts is Mixtral.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe")

_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# llama.cpp interleaves the two rotary halves of each Q/K head for these families only.
_ROPE_PERMUTED = ("llama", "mixtral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.N.<key>.{weight,bias} -> model.layers.N.<value>.{weight,bias}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# MoE router and stacked experts; `{e}` is the expert index.
_MOE_NAMES = {
    "mixtral": {
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
        "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
        "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
    },
    "qwen3_moe": {
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
        "ffn_up_exps": "mlp.experts.{e}.up_proj",
        "ffn_down_exps": "mlp.experts.{e}.down_proj",
    },
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Out(NamedTuple):
    """One tensor of the imported checkpoint and where in the GGUF its values come from."""

    name: str  # HF name
    src: gguf.ReaderTensor
    expert: int | None  # index into a stacked expert tensor, or None for the whole tensor
    rope_heads: int  # >0: undo llama.cpp's Q/K row permutation over this many heads
    shape: tuple[int, ...]  # HF (torch) shape


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Convert a GGUF file into safetensors + config/tokenizer JSON with HF names.

    Args:
        gguf_path: the .gguf file.
        out_dir: an existing, empty directory to write into (the caller renames it into place).
        dtype: dtype of the written weights: torch.float32, torch.bfloat16 or torch.float16.
        progress: called as progress(done_tensors, total_tensors) after each written tensor.
        max_shard_bytes: largest safetensors shard; more than one shard adds an index file.

    Returns:
        None. Raises HeteroError for a corrupt or truncated file, or an unsupported model.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _OUT_DTYPES:
        raise HeteroError(f"cannot import GGUF as {dtype}; choose float32, bfloat16 or float16")
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise HeteroError(f"GGUF import needs an existing empty directory, and {out_dir} is not one")
    reader = _open(gguf_path)
    meta = _metadata(reader, gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    arch = _need(meta, "general.architecture", gguf_path)
    family = _family(arch, meta, gguf_path)

    # Everything that can reject the file runs before the slow part, the weights.
    config = _config(meta, arch, family, tensors, dtype, gguf_path)
    outs = _plan(reader.tensors, family, config, gguf_path)
    tokenizer, tokenizer_config = build_tokenizer(meta, gguf_path)
    _write_weights(outs, out_dir, dtype, max_shard_bytes, progress, gguf_path)
    _write_json(out_dir / "config.json", config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    _write_json(out_dir / "generation_config.json", generation)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


class _CutShort(Exception):
    """The reader asked for bytes past the end of the file."""


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that reports a short file as such, instead of failing later on a reshape."""

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            # data_offset is only set once the header and tensor table have been read.
            part = "tensor data" if hasattr(self, "data_offset") else "header"
            raise _CutShort(f"its {part} runs to byte {end:,} but the file ends at byte {self.data.size:,}")
        return super()._get(offset, dtype, count, override_order)


def _open(path: Path) -> gguf.GGUFReader:
    """Parse the header and tensor table, turning every way that can fail into one HeteroError line."""
    if not path.is_file():
        raise HeteroError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise HeteroError(f"{path} is not a GGUF file: it starts with {magic!r} instead of b'GGUF'")
    if size < 24:  # magic, version, tensor count, metadata count
        raise HeteroError(f"{path} is truncated: {size} bytes is too short for a GGUF header")
    try:
        return _CheckedReader(path)
    except _CutShort as e:
        raise HeteroError(f"{path} is truncated: {e}") from None
    except Exception as e:  # whatever numpy or gguf trip over, the cause is the file's content
        raise HeteroError(f"{path} is a corrupt GGUF file ({type(e).__name__}: {e})") from None


def _metadata(reader: gguf.GGUFReader, path: Path) -> dict:
    try:
        return {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # e.g. a string that is not UTF-8
        raise HeteroError(f"{path} is a corrupt GGUF file: bad metadata ({type(e).__name__}: {e})") from None


def _need(meta: dict, key: str, path: Path):
    if key not in meta:
        raise HeteroError(f"{path} lacks the metadata key '{key}' that the import needs")
    return meta[key]


def _family(arch: str, meta: dict, path: Path) -> str:
    """The HF model_type we import a GGUF architecture as."""
    if arch == "llama":
        return "mixtral" if meta.get("llama.expert_count", 0) else "llama"
    if arch in ("qwen2", "qwen3"):
        return arch
    if arch == "qwen3moe":
        return "qwen3_moe"
    raise HeteroError(
        f"{path} holds a '{arch}' model; GGUF import supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _nice(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _config(meta: dict, arch: str, family: str, tensors: dict, dtype: torch.dtype, path: Path) -> dict:
    """config.json with HF field names, from the `<arch>.*` and `tokenizer.ggml.*` metadata."""

    def key(name, default=...):
        if default is ...:
            return _need(meta, f"{arch}.{name}", path)
        return meta.get(f"{arch}.{name}", default)

    if "token_embd.weight" not in tensors:
        raise HeteroError(f"{path} has no token_embd.weight tensor, so it is not a complete model")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # some files list it per layer
        if len(set(kv_heads)) != 1:
            raise HeteroError(f"{path} has a different KV head count per layer, which is not supported")
        kv_heads = kv_heads[0]
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden // heads
    config = {
        "architectures": [_HF_CLASS[family]],
        "model_type": family,
        "hidden_size": hidden,
        # An all-MoE model has no dense FFN, and its file may omit the width.
        "intermediate_size": key("feed_forward_length", None if family in _MOE_NAMES else ...),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _nice(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _nice(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": key("context_length"),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # ggml order: (hidden, vocab)
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family in ("llama", "mixtral", "qwen3", "qwen3_moe"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if family == "llama":
        config["mlp_bias"] = False
    if family == "mixtral":
        config["num_local_experts"] = key("expert_count")
        config["num_experts_per_tok"] = key("expert_used_count")
    if family == "qwen3_moe":
        config["num_experts"] = key("expert_count")
        config["num_experts_per_tok"] = key("expert_used_count")
        config["moe_intermediate_size"] = key("expert_feed_forward_length")
        # llama.cpp renormalises the top-k router weights for this architecture unless told otherwise.
        config["norm_topk_prob"] = bool(key("expert_weights_norm", True))
        config["decoder_sparse_step"] = 1
        config["mlp_only_layers"] = []
    if config["intermediate_size"] is None:
        del config["intermediate_size"]
    rope_scaling = _rope_scaling(meta, arch, tensors, config, path)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: dict, arch: str, tensors: dict, config: dict, path: Path) -> dict | None:
    """HF rope_scaling from `<arch>.rope.scaling.*`, or from Llama 3's `rope_freqs` tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", ""):
        scaling = {"rope_type": kind, "factor": _nice(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = original
        return scaling
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(tensors["rope_freqs.weight"], config, path)
    return None


def _llama3_scaling(freqs: gguf.ReaderTensor, config: dict, path: Path) -> dict:
    """Llama 3.1+ GGUFs store the rope scaling as per-frequency factors rather than as metadata.

    llama.cpp computes them from HF's llama3 rope_scaling; we recompute them from Meta's low/high
    frequency factors and original context (the same in every release) and accept only a match.
    """
    factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).astype(np.float64).ravel()
    dim, factor = config["head_dim"], float(factors.max())
    low, high, original = 1.0, 4.0, 8192
    wavelen = 2 * math.pi * config["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    # 1 for short wavelengths, `factor` for long ones, a smooth blend in between.
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1 / ((1 - smooth) / factor + smooth)
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise HeteroError(f"{path} has rope_freqs.weight factors that match no rope scaling hetero knows")
    return {
        "rope_type": "llama3",
        "factor": _nice(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _plan(tensors: list, family: str, config: dict, path: Path) -> list[_Out]:
    """Every output tensor, in file order, with its HF name and source."""
    outs = []
    moe = _MOE_NAMES.get(family, {})
    for t in tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        if t.name == "rope_freqs.weight":
            continue  # folded into config.json's rope_scaling
        if t.name in _GLOBAL_NAMES:
            outs.append(_Out(_GLOBAL_NAMES[t.name], t, None, 0, shape))
            continue
        m = _LAYER_TENSOR.fullmatch(t.name)
        part = m and m.group(2)
        if m and part in _LAYER_NAMES:
            heads = 0
            if family in _ROPE_PERMUTED and part in ("attn_q", "attn_k"):
                heads = config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"]
                if shape[0] % (2 * heads):
                    raise HeteroError(f"{path}: {t.name} has {shape[0]} rows, not a multiple of 2*{heads} heads")
            outs.append(_Out(f"model.layers.{m[1]}.{_LAYER_NAMES[part]}.{m[3]}", t, None, heads, shape))
        elif m and part in moe and "{e}" not in moe[part]:
            outs.append(_Out(f"model.layers.{m[1]}.{moe[part]}.{m[3]}", t, None, 0, shape))
        elif m and part in moe:
            # Stacked experts: (E, out, in); each expert becomes its own HF tensor.
            for e in range(shape[0]):
                name = f"model.layers.{m[1]}.{moe[part].format(e=e)}.{m[3]}"
                outs.append(_Out(name, t, e, 0, shape[1:]))
        else:
            raise HeteroError(f"{path} has a tensor '{t.name}' that a {family} import does not know")
    return outs


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order so rotary pairs are (i, i + D/2) as HF's rotate_half expects.

    llama.cpp stores each head's rows interleaved from its two halves: (h, D/2, 2) where HF has
    (h, 2, D/2). Works for weights (rows, in) and biases (rows,).
    """
    return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load(out: _Out, dtype: torch.dtype, path: Path) -> torch.Tensor:
    """Dequantize one output tensor to float32, fix its layout, and cast to `dtype`."""
    t = out.src
    # Quantized data is (rows, bytes per row) per expert, so slicing an expert keeps whole blocks.
    data = t.data if out.expert is None else t.data[out.expert]
    try:
        values = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError:
        kind = t.tensor_type.name
        raise HeteroError(f"{path}: tensor {t.name} is stored as {kind}, which cannot be dequantized yet") from None
    values = np.asarray(values, dtype=np.float32).reshape(out.shape)
    if not values.flags.writeable:  # float32 in the file: a view of the read-only file map
        values = values.copy()
    if out.rope_heads:
        values = np.ascontiguousarray(_unpermute_rope_rows(values, out.rope_heads))
    return torch.from_numpy(values).to(dtype)


def _shards(outs: list[_Out], itemsize: int, max_bytes: int) -> list[list[_Out]]:
    """Group tensors, in order, into shards of at most max_bytes (a lone larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for out in outs:
        nbytes = math.prod(out.shape) * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(out)
        size += nbytes
    return shards + [current] if current else shards


def _write_weights(outs, out_dir: Path, dtype, max_bytes: int, progress, path: Path) -> None:
    """Write shard by shard, so peak memory is about one shard rather than the whole model."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(outs, itemsize, max_bytes)
    weight_map, done, total = {}, 0, len(outs)
    for k, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for out in shard:
            tensors[out.name] = _load(out, dtype, path)
            weight_map[out.name] = file
            done += 1
            if progress is not None:
                progress(done, total)
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total_size = sum(math.prod(o.shape) * itemsize for o in outs)
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        _write_json(out_dir / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
