"""The tiered weight store: every group lives on its plan tier and is brought to the compute device on use.

Groups on the compute tier are bound into the model's modules once. Others are materialised on the
compute device for the duration of one layer (or one expert, or one slice of lm_head) and then
dropped; every byte held, resident or transient, is reserved with the accountant first. Resident
groups are loaded from the checkpoint; disk-tier groups are read from the pack (flash/pack.py) by
the prefetch pipeline (runtime/pipeline.py), which the executor drives.
"""

import re
from contextlib import contextmanager
from math import prod

import torch
import torch.nn.functional as F

from ..errors import HeteroError
from ..flash.reader import make_reader, open_file
from ..placement.groups import Group
from ..placement.plan import HEAD_READ_SLACK, LM_HEAD_CHUNK_BYTES, Plan
from .pipeline import Prefetcher

SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed from the config


class WeightStore:
    """Args:
        model: a CausalLM built on the meta device.
        family: the model family module (for EXPERT_PATTERN / EXPERT_ROLES).
        catalogue: the checkpoint's tensor catalogue.
        groups: groups in execution order (from placement.groups.make_groups).
        plan: a validated Plan.
        device: runtime.device.Device.
        accountant: runtime.memory.Accountant.
        dtype: compute dtype.
        pack: the opened flash.pack.Pack that disk-tier groups are read from (needed when any is on disk).
        reader: a flash.reader reader (default: the native one when built).
    """

    def __init__(self, model, family, catalogue, groups: list[Group], plan: Plan, device, accountant, dtype,
                 pack=None, reader=None):
        self.model, self.cat, self.plan = model, catalogue, plan
        self.device, self.acc, self.dtype = device, accountant, dtype
        self.compute = plan.compute
        self.groups = {g.name: g for g in groups}
        # bytes read from disk / copied to the device, seconds the compute thread waited on reads,
        # seconds the disk was busy with our reads (the union of their intervals)
        self.io = {"disk_read_bytes": 0, "host_to_device_bytes": 0, "io_stall_s": 0.0, "io_busy_s": 0.0}
        self.pack, self.reader, self.pack_fd = pack, None, None
        if "disk" in plan.tiers.values():
            if pack is None:
                raise ValueError("a plan with disk-tier groups needs a pack to read them from")
            self.reader = reader or make_reader()
            self.pack_fd, self.direct = open_file(pack.file, direct=True)
        self._slots = self._bindings(model)
        self._placeholders = {n: getattr(m, a) for n, (m, a) in self._slots.items()}
        self._experts = self._expert_names(family, groups)
        self._check_shapes(groups)
        self.resident: dict[str, dict[str, torch.Tensor]] = {}
        for g in groups:
            tier = plan.tiers[g.name]
            if tier != "disk":
                self.resident[g.name] = {n: self._load(n, tier, "weights") for n in g.tensors}
                if tier == self.compute and g.kind != "expert":  # experts are handed out by expert(), not bound
                    self._bind(self.resident[g.name])
        self.layer_groups = {}
        for g in groups:
            if g.kind in ("attn", "mlp"):
                self.layer_groups.setdefault(g.layer, []).append(g.name)
        tied = model.lm_head is None
        self.head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.head_group = "embed" if tied else "lm_head"
        self.pipe = Prefetcher(self, plan.depth)

    # ------------------------------------------------------------ set-up

    @staticmethod
    def _bindings(model) -> dict:
        slots = {}
        for mname, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                slots[f"{mname}.{pname}" if mname else pname] = (mod, pname)
        return slots

    @staticmethod
    def _expert_names(family, groups) -> dict:
        out = {}
        pattern = getattr(family, "EXPERT_PATTERN", None)
        for g in groups:
            if g.kind == "expert":
                roles = {}
                for n in g.tensors:
                    role = family.EXPERT_ROLES[pattern.fullmatch(n).group(3)]
                    roles[role] = n
                out[(g.layer, g.expert)] = (roles.get("gate"), roles.get("up"), roles.get("down"))
        return out

    def _check_shapes(self, groups: list[Group]):
        expected = {n: tuple(m_a[0]._parameters[m_a[1]].shape) for n, m_a in self._slots.items()}
        for name, shape in expected.items():
            if name not in self.cat:
                raise HeteroError(f"{self.cat.model_dir}: the checkpoint has no tensor {name!r}, which the config requires")
            if self.cat[name].shape != shape:
                raise HeteroError(
                    f"{self.cat.model_dir}: tensor {name!r} has shape {list(self.cat[name].shape)} but config.json "
                    f"implies {list(shape)}; the config does not match the weights"
                )
        used = set(expected) | {n for names in self._experts.values() for n in names}
        for name in (n for g in groups for n in g.tensors if n not in used):
            if re.search(r"\.experts\.(?!\d)", name):
                raise HeteroError(
                    f"{self.cat.model_dir}: tensor {name!r} holds the experts of a layer fused in one tensor; hetero "
                    "reads one tensor per expert (mlp.experts.E.gate_proj.weight, ...), as transformers' "
                    "save_pretrained writes them: save the model again in that layout"
                )
            raise HeteroError(
                f"{self.cat.model_dir}: the checkpoint has a tensor {name!r} that a {self.model.args.model_type} model "
                "with this config.json does not use; the config does not match the weights"
            )
        self._check_experts()

    def _check_experts(self):
        """Every MoE layer has all its experts, each with the gate/up/down shapes config.json implies."""
        args = self.model.args
        C, I = args.hidden_size, args.moe_intermediate_size
        want = ((I, C), (I, C), (C, I))  # gate, up, down
        for block in self.model.moe_blocks():
            for e in range(args.num_experts):
                names = self._experts.get((block.layer_idx, e), (None, None, None))
                for role, name, shape in zip(("gate", "up", "down"), names, want):
                    if name is None:
                        raise HeteroError(
                            f"{self.cat.model_dir}: the checkpoint has no {role} matrix for expert {e} of layer "
                            f"{block.layer_idx}, which the config requires"
                        )
                    if self.cat[name].shape != shape:
                        raise HeteroError(
                            f"{self.cat.model_dir}: tensor {name!r} has shape {list(self.cat[name].shape)} but "
                            f"config.json implies {list(shape)}; the config does not match the weights"
                        )

    # ------------------------------------------------------------ moving bytes

    def _host_rows(self, name: str, start: int, stop: int, purpose: str) -> torch.Tensor:
        """Rows [start, stop) of a tensor read into host memory in the compute dtype, reserved on the cpu tier."""
        src = self.cat
        info = src[name]
        n = (stop - start) * prod(info.shape[1:])
        raw = n * info.dtype.itemsize
        self.acc.reserve("cpu", raw, purpose)
        whole = not info.shape or (start, stop) == (0, info.shape[0])
        t = src.read(name) if whole else src.read_rows(name, start, stop)
        self.io["disk_read_bytes"] += raw
        if t.dtype != self.dtype:
            self.acc.reserve("cpu", n * self.dtype.itemsize, purpose)
            t = t.to(self.dtype)
            self.acc.release("cpu", raw, purpose)
        return t

    def _load(self, name: str, tier: str, purpose: str) -> torch.Tensor:
        """Read one tensor from disk, in the compute dtype, into `tier`'s memory; reserved under `purpose`.

        A tensor bound for the gpu passes through host memory in slices of at most LM_HEAD_CHUNK_BYTES
        (in the compute dtype), which bounds the host staging that placement.plan.staging_bytes counts.
        """
        info = self.cat[name]
        rows = info.shape[0] if info.shape else 1
        if tier == "cpu":
            return self._host_rows(name, 0, rows, purpose)
        step = max(1, LM_HEAD_CHUNK_BYTES // max(1, prod(info.shape[1:]) * self.dtype.itemsize))
        if step >= rows:
            t = self._host_rows(name, 0, rows, "staging")
            return self._host_to_gpu(t, t.nbytes, purpose, release_host=True)
        self.acc.reserve("gpu", prod(info.shape) * self.dtype.itemsize, purpose)
        out = torch.empty(info.shape, dtype=self.dtype, device=self.device.torch_device)
        for start in range(0, rows, step):
            part = self._host_rows(name, start, min(rows, start + step), "staging")
            out[start:start + part.shape[0]].copy_(part)
            self.io["host_to_device_bytes"] += part.nbytes
            self.acc.release("cpu", part.nbytes, "staging")
        return out

    def _host_to_gpu(self, t: torch.Tensor, nbytes: int, purpose: str, release_host: bool) -> torch.Tensor:
        self.acc.reserve("gpu", nbytes, purpose)
        out = self.device.to_tier(t, "gpu")
        self.io["host_to_device_bytes"] += nbytes
        if release_host:
            self.acc.release("cpu", nbytes, "staging")
        return out

    def _bind(self, tensors: dict):
        for name, t in tensors.items():
            mod, attr = self._slots[name]
            mod._parameters[attr] = t

    def _unbind(self, names):
        for name in names:
            mod, attr = self._slots[name]
            mod._parameters[attr] = self._placeholders[name]

    # ------------------------------------------------------------ what the executor calls

    def bind(self, tensors: dict) -> list[str]:
        """Bind fetched tensors (name -> tensor on the compute device) into the model; returns their names."""
        self._bind(tensors)
        return list(tensors)

    def unbind(self, names):
        self._unbind(names)

    def expert_keys(self) -> list[tuple[int, int]]:
        """(layer, expert) of every expert, in execution order."""
        return list(self._experts)

    @staticmethod
    def expert_group(layer: int, e: int) -> str:
        return f"layers.{layer}.experts.{e}"

    def expert_names(self, layer: int, e: int) -> tuple:
        """Tensor names of one expert: (gate, up, down)."""
        return self._experts[(layer, e)]

    def expert_tensors(self, layer: int, e: int) -> tuple:
        """(gate, up, down) of an expert resident on the gpu or cpu tier, where it lives."""
        g = self.resident[self.expert_group(layer, e)]
        return tuple(g[n] for n in self._experts[(layer, e)])

    @contextmanager
    def expert(self, layer: int, e: int):
        """(gate [I, C], up [I, C], down [C, I]) of one expert on the compute device."""
        gname = f"layers.{layer}.experts.{e}"
        names = self._experts[(layer, e)]
        if self.plan.tiers[gname] == self.compute:
            yield tuple(self.resident[gname][n] for n in names)
            return
        try:
            fetched = self.pipe.fetch(gname)
            yield tuple(fetched[n] for n in names)
        finally:
            self.pipe.release(gname)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> hidden [B, T, C]; off-device tables are gathered row by row."""
        dev = self.device.torch_device
        if self.plan.tiers["embed"] == self.compute:
            return F.embedding(ids.to(dev), self.resident["embed"]["model.embed_tokens.weight"])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        if self.plan.tiers["embed"] == "cpu":
            rows = self.resident["embed"]["model.embed_tokens.weight"][uniq]
        else:
            name = "model.embed_tokens.weight"
            rows = torch.cat([self.pack.read_rows(name, i, i + 1, self.dtype) for i in uniq.tolist()])
            self.io["disk_read_bytes"] += len(uniq) * self.pack.stored_row_bytes(name)
        rows = self.device.to_tier(rows, self.compute) if self.compute == "gpu" else rows
        return F.embedding(inverse.to(dev), rows)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, C] -> logits [B, T, V], streaming lm_head in vocabulary slices when it is off-device."""
        tier = self.plan.tiers[self.head_group]
        if tier == self.compute:
            return F.linear(h, self.resident[self.head_group][self.head_name])
        V, C = self.cat[self.head_name].shape
        rows = max(1, LM_HEAD_CHUNK_BYTES // (C * self.dtype.itemsize))
        out = h.new_empty((*h.shape[:-1], V))
        slack = HEAD_READ_SLACK if tier == "disk" else 0  # direct reads are widened to alignment
        self.acc.reserve("cpu", slack, "staging")
        try:
            for start in range(0, V, rows):
                stop = min(V, start + rows)
                w = self._head_rows(tier, start, stop)
                out[..., start:stop] = F.linear(h, w)
                self.acc.release(self.compute, w.nbytes, "staging")
                del w
        finally:
            self.acc.release("cpu", slack, "staging")
        return out

    def _head_rows(self, tier: str, start: int, stop: int) -> torch.Tensor:
        C = self.cat[self.head_name].shape[1]
        nbytes = (stop - start) * C * self.dtype.itemsize
        if tier == "cpu":  # computing on the gpu
            return self._host_to_gpu(self.resident[self.head_group][self.head_name][start:stop], nbytes, "staging", False)
        # the slice as stored in the pack, plus its conversion to the compute dtype when it is not a view
        raw = (stop - start) * self.pack.stored_row_bytes(self.head_name)
        held = raw + (0 if self.pack.is_view(self.head_group, self.dtype) else nbytes)
        self.acc.reserve("cpu", held, "staging")
        w = self.pack.read_rows(self.head_name, start, stop, self.dtype)
        self.io["disk_read_bytes"] += raw
        self.acc.release("cpu", held - nbytes, "staging")
        if self.compute == "gpu":
            return self._host_to_gpu(w, nbytes, "staging", release_host=True)
        return w

    def resident_bytes(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for g in self.groups.values():
            out[self.plan.tiers[g.name]] += g.nbytes
        return out
