"""Symmetric group-wise weight-only quantization (int8, int4) and its dequantization kernels.

A weight W [R, C] is cut along its input dimension into groups of `group_size` columns; each
(row, group) gets one scale s = max|w| / qmax and stores round(w / s) in [-qmax, qmax]
(qmax 127 for int8, 7 for int4). int4 packs two columns per byte: column 2i in the low nibble,
2i+1 in the high one, each stored as q + 8.

Dequantization runs as numba kernels on the CPU (dequant_kernels.py; writing the compute dtype directly, bfloat16
included) and as torch ops on an accelerator; both compute q * s in float32
and round once to the output dtype, so they agree bit for bit.

Shape legend: R rows (output features), C columns (input features), G = C / group_size.
"""

import threading

import torch

QMAX = {8: 127, 4: 7}


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] float -> (q, scales float32 [R, G]); q is int8 [R, C] (bits=8) or uint8 [R, C/2] (bits=4)."""
    R, C = w.shape
    g = w.float().reshape(R, C // group_size, group_size)
    # rounded to float16 (as stored) before use, so q matches the scale it is read back with
    scales = (g.abs().amax(dim=-1) / QMAX[bits]).clamp(max=65504.0).half().float()  # [R, G]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(g / safe[..., None]).clamp_(-QMAX[bits], QMAX[bits]).to(torch.int8).reshape(R, C)
    if bits == 4:
        u = (q + 8).to(torch.uint8).reshape(R, C // 2, 2)
        q = u[..., 0] | (u[..., 1] << 4)
    return q, scales


def dequantize_torch(q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference kernel (and the accelerator one): q, scales as from quantize() -> [R, C] in dtype."""
    if bits == 4:
        lo = (q & 0xF).to(torch.int8) - 8
        hi = (q >> 4).to(torch.int8) - 8
        q = torch.stack([lo, hi], dim=-1).reshape(q.shape[0], -1)
    R, C = q.shape
    w = q.reshape(R, C // group_size, group_size).float() * scales.float()[..., None]
    return w.reshape(R, C).to(dtype)


_kernels = None


def _numba_kernels():
    global _kernels
    if _kernels is None:
        try:
            from . import dequant_kernels

            _kernels = dequant_kernels.to_f32, dequant_kernels.to_bf16
        except ImportError:
            from .reader import say_once

            say_once("numba", "numba is not installed; dequantizing int8/int4 weights with torch on the CPU (slower)")
            _kernels = False
    return _kernels


_launch = threading.Lock()  # numba's fallback threading layer (workqueue) must not be entered by two threads at once


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """q, scales (as quantize() returns) -> W [R, C] in `dtype`, on q's device.

    Args:
        out: an optional [R, C] `dtype` tensor to write into (the caller's accounted buffer).
    """
    R = q.shape[0]
    C = q.shape[1] * (2 if bits == 4 else 1)
    kernels = _numba_kernels() if q.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else False
    if not kernels:
        w = dequantize_torch(q, scales, bits, group_size, dtype)
        return w if out is None else out.copy_(w)
    to_f32, to_bf16 = kernels
    out = torch.empty((R, C), dtype=dtype) if out is None else out
    qn = q.numpy() if bits == 4 else q.view(torch.int8).numpy()
    sn = scales.float().numpy()
    with _launch:
        if dtype == torch.float32:
            to_f32(qn, sn, out.numpy(), bits, group_size)
        else:
            to_bf16(qn, sn, out.view(torch.int16).numpy().view("uint16"), bits, group_size)
    return out
