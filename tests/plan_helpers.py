"""Helpers for the planner tests: a synthetic hardware profile and small model descriptions.

The synthetic profile's numbers are plausible for a laptop with an NVMe SSD (and, with gpu=True, a
PCIe accelerator); they make the tests deterministic. Real figures are measured by `hetero profile`.
"""

import torch

from hetero.config import ModelArgs
from hetero.models import supported_model_types
from hetero.placement.describe import describe, expected_tensors
from hetero.placement.hardware import Profile

MiB = 2**20
BLOCKS = [4096, 65536, MiB, 4 * MiB, 16 * MiB, 30 * MiB, 64 * MiB]


def synthetic_profile(gpu: bool = False, fingerprint: dict | None = None) -> Profile:
    over = {mt: {"attn": 150e-6, "mlp": 40e-6, "step": 50e-6, "moe": 60e-6, "expert": 35e-6} for mt in supported_model_types()}
    cpu = {"matvec": {"float32": [[512, 8e9], [4096, 12e9]], "bfloat16": [[512, 4e9], [4096, 4e9]],
                      "float16": [[512, 4e9], [4096, 4e9]]},
           "matmul_flops": {"float32": 50e9, "bfloat16": 100e9, "float16": 20e9}, "op_s": 2e-6, "overheads": over,
           "dequant_bps": {"float32": 10e9, "bfloat16": 8e9, "float16": 2e9},
           "lossless_bps": {"exp4": {"float32": 16e9, "bfloat16": 16e9}}}
    compute, h2d = {"cpu": cpu}, None
    if gpu:
        compute["cuda"] = {"matvec": {k: [[512, 1e12], [4096, 2e12]] for k in ("float32", "bfloat16", "float16")},
                           "matmul_flops": {"float32": 5e13, "bfloat16": 5e14, "float16": 5e14}, "op_s": 8e-6,
                           "overheads": {mt: {k: v / 2 for k, v in o.items()} for mt, o in over.items()}}
        h2d = {"pageable": [[b, b / (b / 12e9 + 10e-6)] for b in BLOCKS], "pinned": [[b, 24e9] for b in BLOCKS],
               "device_to_host_bps": 20e9}
    return Profile(
        fingerprint=fingerprint or {"cpu": "synthetic"}, ram_bytes=64 * 2**30, gpu_bytes=80 * 2**30 if gpu else None,
        disk_free_bytes=2**40, disk_dir="/tmp",
        disk_read={"buffered": [[b, b / (b / 2e9 + 20e-6)] for b in BLOCKS],
                   "direct": [[b, b / (b / 3e9 + 50e-6)] for b in BLOCKS],
                   "pool": [[b, b / (b / 3e9 + 40e-6)] for b in BLOCKS]},
        host_clone=[[b, 5e9] for b in BLOCKS], ram_read_bps=8e9, host_to_device=h2d, compute=compute,
    )


def tiny_desc(model_type: str = "mixtral", layers: int = 2, experts: int = 4, dtype=torch.float32, **extra):
    """A ModelDesc of a tiny model derived from its config (no checkpoint)."""
    cfg = dict(model_type=model_type, vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg.update(extra)
    if model_type in ("mixtral",):
        cfg.update(num_local_experts=experts, num_experts_per_tok=2)
    args = ModelArgs.from_dict(cfg)
    return describe(args, expected_tensors(args, dtype), dtype, "config")
