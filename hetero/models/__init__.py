"""Model families, one file each, found by config.json's `model_type`.

A family module provides:
    MODEL_TYPES     the model_type strings it serves
    build(args)     -> CausalLM built on the meta device (weights are bound by the runtime)
    EXPERT_PATTERN  None for dense models, else a regex over checkpoint names with groups
                    (layer, expert, role) where role names the gate / up / down matrix
    EXPERT_ROLES    maps the role group to "gate" | "up" | "down"
"""

import importlib

from ..config import ModelArgs
from ..errors import HeteroError

_FAMILY_FILES = ("llama", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _families():
    out = {}
    for name in _FAMILY_FILES:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue
        for t in mod.MODEL_TYPES:
            out[t] = mod
    return out


def supported_model_types() -> list[str]:
    return sorted(_families())


def family_for(args: ModelArgs):
    fam = _families().get(args.model_type)
    if fam is None:
        raise HeteroError(
            f"model_type {args.model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return fam
