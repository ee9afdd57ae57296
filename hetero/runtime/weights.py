"""The tiered weight store: every group lives on its plan tier and is brought to the compute device on use.

Groups on the compute tier are bound into the model's modules once. Others are materialised on the
compute device for the duration of one layer (or one expert, or one slice of lm_head) and then
dropped; every byte held, resident or transient, is reserved with the accountant first.
"""

from contextlib import contextmanager
from math import prod

import torch
import torch.nn.functional as F

from ..errors import HeteroError
from ..placement.groups import Group
from ..placement.plan import LM_HEAD_CHUNK_BYTES, Plan

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
    """

    def __init__(self, model, family, catalogue, groups: list[Group], plan: Plan, device, accountant, dtype):
        self.model, self.cat, self.plan = model, catalogue, plan
        self.device, self.acc, self.dtype = device, accountant, dtype
        self.compute = plan.compute
        self.groups = {g.name: g for g in groups}
        self.io = {"disk_read_bytes": 0, "host_to_device_bytes": 0}
        self._slots = self._bindings(model)
        self._placeholders = {n: getattr(m, a) for n, (m, a) in self._slots.items()}
        self._experts = self._expert_names(family, groups)
        self._check_shapes()
        self.resident: dict[str, dict[str, torch.Tensor]] = {}
        for g in groups:
            tier = plan.tiers[g.name]
            if tier != "disk":
                self.resident[g.name] = {n: self._load(n, tier, "weights") for n in g.tensors}
                if tier == self.compute:
                    self._bind(self.resident[g.name])
        self.layer_groups = {}
        for g in groups:
            if g.kind in ("attn", "mlp"):
                self.layer_groups.setdefault(g.layer, []).append(g.name)
        tied = model.lm_head is None
        self.head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.head_group = "embed" if tied else "lm_head"

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
                out[(g.layer, g.expert)] = (roles["gate"], roles["up"], roles["down"])
        return out

    def _check_shapes(self):
        expected = {n: tuple(m_a[0]._parameters[m_a[1]].shape) for n, m_a in self._slots.items()}
        for name, shape in expected.items():
            if name not in self.cat:
                raise HeteroError(f"{self.cat.model_dir}: the checkpoint has no tensor {name!r}, which the config requires")
            if self.cat[name].shape != shape:
                raise HeteroError(
                    f"{self.cat.model_dir}: tensor {name!r} has shape {list(self.cat[name].shape)} but config.json "
                    f"implies {list(shape)}; the config does not match the weights"
                )

    # ------------------------------------------------------------ moving bytes

    def _load(self, name: str, tier: str, purpose: str) -> torch.Tensor:
        """Read one tensor from disk, in the compute dtype, into `tier`'s memory; reserved under `purpose`."""
        info = self.cat[name]
        host_tier = "cpu"
        raw_bytes = info.nbytes
        self.acc.reserve(host_tier, raw_bytes, purpose if tier == "cpu" else "staging")
        t = self.cat.read(name)
        self.io["disk_read_bytes"] += raw_bytes
        if t.dtype != self.dtype:
            conv = prod(info.shape) * self.dtype.itemsize
            self.acc.reserve(host_tier, conv, purpose if tier == "cpu" else "staging")
            t = t.to(self.dtype)
            self.acc.release(host_tier, raw_bytes, purpose if tier == "cpu" else "staging")
            raw_bytes = conv
        if tier == "cpu":
            return t
        return self._host_to_gpu(t, raw_bytes, purpose, release_host=True)

    def _host_to_gpu(self, t: torch.Tensor, nbytes: int, purpose: str, release_host: bool) -> torch.Tensor:
        self.acc.reserve("gpu", nbytes, purpose)
        out = self.device.to_tier(t, "gpu")
        self.io["host_to_device_bytes"] += nbytes
        if release_host:
            self.acc.release("cpu", nbytes, "staging")
        return out

    def _fetch(self, name: str, group: str) -> torch.Tensor:
        """One tensor of a non-compute-tier group on the compute device, reserved as staging."""
        if self.plan.tiers[group] == "disk":
            return self._load(name, self.compute, "staging")
        t = self.resident[group][name]  # cpu tier, computing on the gpu
        return self._host_to_gpu(t, t.nbytes, "staging", release_host=False)

    def _drop(self, tensors: dict):
        for t in tensors.values():
            self.acc.release(self.compute, t.nbytes, "staging")

    def _bind(self, tensors: dict):
        for name, t in tensors.items():
            mod, attr = self._slots[name]
            mod._parameters[attr] = t

    def _unbind(self, names):
        for name in names:
            mod, attr = self._slots[name]
            mod._parameters[attr] = self._placeholders[name]

    # ------------------------------------------------------------ what the executor calls

    @contextmanager
    def layer(self, j: int):
        """Layer j's attention and MLP weights bound on the compute device for the duration of the block."""
        fetched = {}
        try:
            for gname in self.layer_groups.get(j, ()):
                if self.plan.tiers[gname] != self.compute:
                    for n in self.groups[gname].tensors:
                        fetched[n] = self._fetch(n, gname)
            self._bind(fetched)
            yield
        finally:
            self._unbind(fetched)
            self._drop(fetched)

    @contextmanager
    def expert(self, layer: int, e: int):
        """(gate [I, C], up [I, C], down [C, I]) of one expert on the compute device."""
        gname = f"layers.{layer}.experts.{e}"
        names = self._experts[(layer, e)]
        if self.plan.tiers[gname] == self.compute:
            yield tuple(self.resident[gname][n] for n in names)
            return
        fetched = {}
        try:
            for n in names:
                fetched[n] = self._fetch(n, gname)
            yield tuple(fetched[n] for n in names)
        finally:
            self._drop(fetched)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> hidden [B, T, C]; off-device tables are gathered row by row."""
        dev = self.device.torch_device
        if self.plan.tiers["embed"] == self.compute:
            return F.embedding(ids.to(dev), self.resident["embed"]["model.embed_tokens.weight"])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        if self.plan.tiers["embed"] == "cpu":
            rows = self.resident["embed"]["model.embed_tokens.weight"][uniq]
        else:
            rows = torch.cat([self.cat.read_rows("model.embed_tokens.weight", i, i + 1) for i in uniq.tolist()])
            self.io["disk_read_bytes"] += rows.nbytes
            rows = rows.to(self.dtype)
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
        for start in range(0, V, rows):
            stop = min(V, start + rows)
            w = self._head_rows(tier, start, stop)
            out[..., start:stop] = F.linear(h, w)
            self.acc.release(self.compute, w.nbytes, "staging")
            del w
        return out

    def _head_rows(self, tier: str, start: int, stop: int) -> torch.Tensor:
        C = self.cat[self.head_name].shape[1]
        nbytes = (stop - start) * C * self.dtype.itemsize
        if tier == "cpu":  # computing on the gpu
            return self._host_to_gpu(self.resident[self.head_group][self.head_name][start:stop], nbytes, "staging", False)
        raw = (stop - start) * C * self.cat[self.head_name].dtype.itemsize
        self.acc.reserve("cpu", raw, "staging")
        w = self.cat.read_rows(self.head_name, start, stop)
        self.io["disk_read_bytes"] += raw
        if w.dtype != self.dtype:
            self.acc.reserve("cpu", nbytes, "staging")
            w = w.to(self.dtype)
            self.acc.release("cpu", raw, "staging")
        if self.compute == "gpu":
            return self._host_to_gpu(w, nbytes, "staging", release_host=True)
        return w

    def resident_bytes(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for g in self.groups.values():
            out[self.plan.tiers[g.name]] += g.nbytes
        return out
