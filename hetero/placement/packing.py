"""Which pack the disk tier reads, when the user names none: the lossless format predicted fastest.

A bfloat16 checkpoint can be read from disk as plain bfloat16 (a read buffer that *is* the weights)
or as bf16z (flash/lossless.py: a quarter fewer bytes, decoded on the compute device). Which is
faster depends on the machine: a slow disk under a fast decoder favours bf16z, a fast disk under a
busy compute thread plain bytes. The planner places the model for each and the cost model decides.
"""

from dataclasses import replace

import torch

from ..flash.pack import PackFormat, has_pack, planned_extents
from .cost import predict
from .describe import ModelDesc

# a format other than the first is chosen only when predicted this much faster: about the cost model's
# median error on this machine (benchmarks/plan_accuracy.py), since a wrong pick costs time on every
# token. On moe_offload.py's MoE it predicted bf16z 4% faster and it ran 10% slower (fewer cache slots,
# decode on the compute thread of a plan bound by compute); on ssd_bound.py's dense model, 32% faster.
MARGIN = 0.10


def lossless_formats(desc: ModelDesc, model_dir=None, disk_dir=None) -> list[PackFormat]:
    """The pack formats that hold exactly the checkpoint's values for this compute dtype, the incumbent
    first: one already written for `model_dir` (a second pack of a large model costs its size on disk
    again, so it is written only when predicted MARGIN faster), else the plain one."""
    plain = PackFormat.parse(desc.dtype)
    weights = [dt for shape, dt in desc.tensors.values() if len(shape) == 2]
    if not (weights and all(dt == torch.bfloat16 for dt in weights) and desc.dtype in (torch.bfloat16, torch.float32)):
        return [plain]
    formats = [plain, PackFormat.parse("bf16z")]
    if model_dir is not None:
        formats.sort(key=lambda f: not has_pack(model_dir, f, disk_dir))  # stable: plain first among equals
    return formats


def pick_format(desc: ModelDesc, formats: list[PackFormat], profile, workload, plan_for):
    """(format, staging extents, plan, prediction) of the fastest format to read disk-tier weights from.

    Args:
        formats: candidates, the default first (lossless_formats); one alone is simply planned.
        workload: the cost model's Workload (its extents are replaced by each format's).
        plan_for: extents -> (a Plan made with those extents by the caller's planner and budgets, its
            prediction or None to have it predicted here).
    A plan that puts nothing on disk reads no pack: the first format stands then.
    """
    best = None
    for fmt in formats:
        if best is not None and "disk" not in best[2].tiers.values():
            break
        extents = planned_extents(desc.tensors, desc.groups, fmt, desc.dtype)
        if best is not None:
            # the first format's placement read from this pack: not faster, and it is not planned at all
            # (planning a 235B MoE takes most of a second)
            same = predict(desc, best[2], profile, replace(workload, extents=extents))
            if same.decode_s_per_token >= best[3].decode_s_per_token:
                continue
        plan, prediction = plan_for(extents)
        prediction = prediction or predict(desc, plan, profile, replace(workload, extents=extents))
        if best is None or prediction.decode_s_per_token < (1 - MARGIN) * best[3].decode_s_per_token:
            best = (fmt, extents, plan, prediction)
    return best
