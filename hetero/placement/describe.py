"""What the planner and the cost model know of a model: its config, its groups, and the sizes the runtime reads.

Built from a checkpoint's safetensors headers (no weights are read) or, for a directory holding only
config.json, from the architecture: the family's `build(args)` gives a meta model whose parameters
have the checkpoint's names and shapes, and the family's EXPERT_PATTERN gives the experts' names.
"""

import re
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from ..checkpoint.catalogue import SIDE_FILES, Catalogue
from ..config import ModelArgs
from ..errors import HeteroError
from ..models import family_for
from .groups import make_groups

SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry (runtime.weights.SKIPPED)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelDesc:
    """A model as the cost model sees it.

    Attributes:
        args: the config.
        groups: groups in execution order (sizes in the compute dtype).
        dtype: the compute dtype.
        reads: group name -> stored bytes of each of its tensors (one read each when fetched from disk).
        cols: group name -> the row width (last dimension) of each of its tensors, in the same order.
        stored_bytes: the checkpoint's size (as stored).
        source: "checkpoint" (headers read) or "config" (shapes derived from config.json).
        tensors: tensor name -> (shape, stored dtype): what a pack's layout is computed from.
    """

    args: ModelArgs
    groups: tuple
    dtype: torch.dtype
    reads: dict = field(hash=False)
    cols: dict = field(hash=False)
    stored_bytes: int
    source: str
    tensors: dict = field(hash=False, compare=False, default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def parameters(self) -> int:
        return self.total_bytes // self.dtype.itemsize


def checkpoint_tensors(args: ModelArgs, cat: Catalogue) -> dict:
    """name -> (shape, dtype) of the tensors the model uses (tied lm_head and stale buffers dropped)."""
    out = {}
    for name, info in cat.tensors.items():
        if name.endswith(SKIPPED) or (args.tie_word_embeddings and name == "lm_head.weight"):
            continue
        out[name] = (info.shape, info.dtype)
    return out


def _expert_names(pattern: re.Pattern, roles: dict):
    """A format string "…{layer}…{expert}…{role}…" from the family's EXPERT_PATTERN, checked against it."""
    src = pattern.pattern
    src = re.sub(r"\(\\d\+\)", "{layer}", src, count=1)
    src = re.sub(r"\(\\d\+\)", "{expert}", src, count=1)
    src = re.sub(r"\((?:[A-Za-z0-9_]+\|)+[A-Za-z0-9_]+\)", "{role}", src, count=1)
    template = src.replace("\\.", ".")
    sample = template.format(layer=0, expert=0, role=next(iter(roles)))
    if not pattern.fullmatch(sample):
        raise HeteroError(f"cannot derive expert tensor names from the pattern {pattern.pattern!r}")
    return template


class _SkipInit(TorchFunctionMode):
    """Skip parameter initialisation while building a meta model: only shapes are wanted, and the meta
    normal_ of nn.Embedding costs seconds the first time a process runs it."""

    SKIP = ("normal_", "uniform_", "kaiming_uniform_", "zero_", "zeros_", "ones_", "fill_", "trunc_normal_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIP:
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **kwargs)


def expected_tensors(args: ModelArgs, stored: torch.dtype) -> dict:
    """name -> (shape, stored dtype) of every tensor a checkpoint of this config holds, derived from the architecture.

    Args:
        args: the config.
        stored: the dtype the weights are assumed to be stored in.
    """
    fam = family_for(args)
    with _SkipInit():
        model = fam.build(args)  # on the meta device: shapes only, no memory
    out = {name: (tuple(p.shape), stored) for name, p in model.named_parameters()}
    pattern = getattr(fam, "EXPERT_PATTERN", None)
    blocks = [b.layer_idx for b in model.moe_blocks()]
    if pattern is not None and blocks:
        template = _expert_names(pattern, fam.EXPERT_ROLES)
        C, I = args.hidden_size, args.moe_intermediate_size
        shapes = {"gate": (I, C), "up": (I, C), "down": (C, I)}
        roles = [(key, shapes[role]) for key, role in fam.EXPERT_ROLES.items()]
        for layer in blocks:
            for e in range(args.num_experts):
                for key, shape in roles:
                    out[template.format(layer=layer, expert=e, role=key)] = (shape, stored)
    return out


def describe(args: ModelArgs, tensors: dict, dtype: torch.dtype, source: str = "checkpoint") -> ModelDesc:
    """A ModelDesc from tensor name -> (shape, stored dtype)."""
    fam = family_for(args)
    groups = make_groups(tensors, getattr(fam, "EXPERT_PATTERN", None), dtype)
    reads = {g.name: tuple(prod(tensors[n][0]) * tensors[n][1].itemsize for n in g.tensors) for g in groups}
    cols = {g.name: tuple(tensors[n][0][-1] if tensors[n][0] else 1 for n in g.tensors) for g in groups}
    stored = sum(prod(s) * d.itemsize for s, d in tensors.values())
    return ModelDesc(args, tuple(groups), dtype, reads, cols, stored, source, dict(tensors))


def compute_dtype(dtype, stored: Counter) -> torch.dtype:
    """The compute dtype: the one asked for, else the checkpoint's most common floating dtype."""
    if dtype is None:
        return stored.most_common(1)[0][0] if stored else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in COMPUTE_DTYPES:
        raise HeteroError(f"dtype {dtype!r}: choose one of float32, bfloat16, float16")
    return COMPUTE_DTYPES[dtype]


def describe_dir(path, dtype=None) -> ModelDesc:
    """Describe the model in directory `path` from its headers, or from config.json alone when it has no weights.

    Args:
        path: a Hugging Face model directory.
        dtype: compute dtype (name or torch.dtype); default the checkpoint's (config-only: config.json's
            torch_dtype, else bfloat16).
    """
    path = Path(path)
    args = ModelArgs.from_dir(path)
    has_weights = (any(p.name not in SIDE_FILES for p in path.glob("*.safetensors"))  # a trace alone is no weights
                   or (path / "model.safetensors.index.json").is_file())
    if has_weights:
        cat = Catalogue(path)
        try:
            tensors = checkpoint_tensors(args, cat)
        finally:
            cat.close()
        floats = Counter(d for _, d in tensors.values() if d.is_floating_point)
        return describe(args, tensors, compute_dtype(dtype, floats), "checkpoint")
    stored = COMPUTE_DTYPES.get(str(args.torch_dtype or "bfloat16").replace("torch.", ""), torch.bfloat16)
    tensors = expected_tensors(args, stored)
    return describe(args, tensors, compute_dtype(dtype, Counter([stored])), "config")
