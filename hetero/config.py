"""ModelArgs: the architecture of a model, read from its config.json with HF field names kept."""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import HeteroError


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # rope: transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    # mixture of experts (names differ per family; normalised in __post_init__)
    num_local_experts: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    sliding_window: int | None = None
    use_sliding_window: bool = False
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_experts is None:
            self.num_experts = self.num_local_experts
        if self.moe_intermediate_size is None and self.num_experts:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_attention_heads % self.num_key_value_heads:
            raise HeteroError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise HeteroError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only silu)")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Build from a config.json dict; unknown keys are kept in `raw`."""
        d = dict(d)
        if "text_config" in d and "hidden_size" not in d:
            d = {**d["text_config"], "model_type": d["text_config"].get("model_type", d.get("model_type"))}
        rope = d.pop("rope_parameters", None)
        if isinstance(rope, dict):
            d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d["rope_scaling"] = rope
            if "partial_rotary_factor" in rope:
                d.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in fields(cls)} - {"raw"}
        missing = [n for n in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if d.get(n) is None]
        if missing:
            raise HeteroError(f"config.json is missing {', '.join(missing)}")
        if d.get("intermediate_size") is None:
            d["intermediate_size"] = d.get("moe_intermediate_size") or 4 * d["hidden_size"]
        kwargs = {k: v for k, v in d.items() if k in names and v is not None or k in ("rope_scaling",)}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
        try:
            return cls(**kwargs, raw=d)
        except TypeError as e:
            raise HeteroError(f"config.json: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelArgs":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise HeteroError(f"{model_dir}: no config.json; point hetero at a Hugging Face model directory or a .gguf file")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise HeteroError(f"{path}: not valid JSON ({e})") from None

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default"
