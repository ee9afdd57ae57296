"""Every accelerator-specific call lives here.

With HETERO_FAKE_GPU=1 (or device="fake-gpu") the gpu tier is backed by host memory and compute
runs there, so every three-tier code path except the literal CUDA calls runs on machines without
an accelerator (CI, laptops). Copies to the fake gpu are real copies, so staging is exercised.
"""

import os
from dataclasses import dataclass

import torch

from ..errors import HeteroError


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" | "fake-gpu" | "cpu"

    @property
    def has_gpu(self) -> bool:
        return self.kind != "cpu"

    @property
    def compute_tier(self) -> str:
        return "gpu" if self.has_gpu else "cpu"

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda") if self.kind == "cuda" else torch.device("cpu")

    def to_tier(self, t: torch.Tensor, tier: str) -> torch.Tensor:
        """A copy of `t` in the memory of `tier` ("gpu" or "cpu")."""
        if tier == "gpu":
            if self.kind == "cuda":
                return t.to("cuda", non_blocking=False)
            if self.kind == "fake-gpu":
                return t.clone()
            raise RuntimeError("no gpu tier on this device")
        return t.cpu() if t.is_cuda else t

    def gpu_memory_bytes(self) -> int | None:
        """Free accelerator memory, or None without one (or for the fake one, which has no size)."""
        if self.kind == "cuda":
            free, _total = torch.cuda.mem_get_info()
            return int(free)
        return None

    def name(self) -> str:
        if self.kind == "cuda":
            return torch.cuda.get_device_name()
        return "host memory standing in for a gpu (HETERO_FAKE_GPU)" if self.kind == "fake-gpu" else "cpu"

    def synchronize(self):
        if self.kind == "cuda":
            torch.cuda.synchronize()


def detect(device: str | None = None) -> Device:
    """Pick the compute device: an explicit choice, else HETERO_FAKE_GPU, else CUDA when present, else the CPU."""
    if device is None:
        if os.environ.get("HETERO_FAKE_GPU", "") not in ("", "0"):
            device = "fake-gpu"
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = {"gpu": "cuda"}.get(device, device)
    if device not in ("cuda", "fake-gpu", "cpu"):
        raise HeteroError(f"device {device!r} is not one of cpu, cuda, fake-gpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise HeteroError("device 'cuda' asked for, but torch sees no CUDA device; use device='cpu'")
    return Device(device)
