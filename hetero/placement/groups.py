"""Tensor groups: the units that the plan places on a tier and the runtime moves as one.

Groups, in execution order: "norms" (every RMSNorm weight, tiny), "embed", then per layer
"layers.{l}.attn", "layers.{l}.mlp" (a dense MLP, or an MoE layer's router and shared expert)
and "layers.{l}.experts.{e}", and finally "lm_head" (absent when tied to the embeddings).
"""

import re
from dataclasses import dataclass
from math import prod

import torch

from ..errors import HeteroError

_NORM = re.compile(r"model\.norm\.weight|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn\.)?")


@dataclass(frozen=True)
class Group:
    name: str
    kind: str  # norms | embed | attn | mlp | expert | lm_head
    tensors: tuple[str, ...]
    nbytes: int  # in the compute dtype
    layer: int | None = None
    expert: int | None = None
    # converting from the stored dtype briefly holds one raw tensor beside the converted ones
    convert_extra: int = 0
    raw_ratio: float = 0.0  # stored / compute bytes per element when they differ, else 0

    @property
    def stage_bytes(self) -> int:
        return self.nbytes + self.convert_extra


def group_of(name: str, expert_pattern) -> tuple[str, str, int | None, int | None]:
    """(group name, kind, layer, expert) of one checkpoint tensor name."""
    if expert_pattern is not None:
        m = expert_pattern.fullmatch(name)
        if m:
            layer, expert = int(m.group(1)), int(m.group(2))
            return f"layers.{layer}.experts.{expert}", "expert", layer, expert
    if name == "model.embed_tokens.weight":
        return "embed", "embed", None, None
    if name == "lm_head.weight":
        return "lm_head", "lm_head", None, None
    if _NORM.fullmatch(name):
        return "norms", "norms", None, None
    m = _LAYER.match(name)
    if m:
        layer = int(m.group(1))
        if m.group(2):
            return f"layers.{layer}.attn", "attn", layer, None
        return f"layers.{layer}.mlp", "mlp", layer, None
    raise HeteroError(f"checkpoint tensor {name!r} does not belong to this architecture")


def _order(g: Group) -> tuple:
    kinds = {"norms": 0, "embed": 1, "attn": 2, "mlp": 3, "expert": 4, "lm_head": 9}
    layer = -1 if g.layer is None else g.layer
    if g.kind == "lm_head":
        layer = 1 << 30
    return (layer, kinds[g.kind], g.expert or 0)


def make_groups(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], expert_pattern, dtype: torch.dtype) -> list[Group]:
    """Group tensors by what is placed and moved together.

    Args:
        tensors: tensor name -> (shape, stored dtype), from the checkpoint headers (or derived from the config).
        expert_pattern: the family's regex for expert tensors, or None.
        dtype: compute dtype; sizes are counted in it.
    Returns:
        Groups in execution order.
    """
    members: dict[str, list] = {}
    info: dict[str, tuple] = {}
    for name in tensors:
        gname, kind, layer, expert = group_of(name, expert_pattern)
        members.setdefault(gname, []).append(name)
        info[gname] = (kind, layer, expert)
    groups = []
    for g, names in members.items():
        raw = [prod(tensors[n][0]) * tensors[n][1].itemsize for n in names if tensors[n][1] != dtype]
        ratio = max((tensors[n][1].itemsize / dtype.itemsize for n in names if tensors[n][1] != dtype), default=0.0)
        nbytes = sum(prod(tensors[n][0]) for n in names) * dtype.itemsize
        groups.append(Group(g, info[g][0], tuple(sorted(names)), nbytes, info[g][1], info[g][2], max(raw, default=0), ratio))
    return sorted(groups, key=_order)


def kv_bytes_per_token(args, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token over all layers."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * dtype.itemsize
