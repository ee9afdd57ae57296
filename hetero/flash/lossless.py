"""Lossless compression of bfloat16 weights: 12 bits a weight instead of 16, decoded bit for bit.

A bfloat16 is a sign bit, 8 exponent bits and 7 mantissa bits. The mantissa and sign are close to
random, but a weight matrix's exponents are not: they crowd into a few binades (about 2.6 bits of
entropy in SmolLM2's matrices, as in generated Gaussian ones). The "exp4" codec stores

    lo     [n] uint8   the sign in bit 7, the 7 mantissa bits below it;
    codes  [n/2] uint8 a 4-bit code per weight: 1..15 mean exponent base + code, 0 means exponent 0
                       (zeros and subnormals) unless the position is an escape;
    escapes            the few weights whose exponent is neither 0 nor in base+1..base+15:
                       positions [m] uint32, then exponents [m] uint8,

with `base` chosen per tensor to cover the most weights (SmolLM2: 1 weight in 10^4 escapes). Codes
are planar in blocks of BLOCK = 32 weights: block b's 16 code bytes hold weights 32b..32b+15 in their
low nibbles and 32b+16..32b+31 in their high ones, so a decoder reads and writes contiguous lanes
and vectorizes (numba, ~9 GB/s of bfloat16 per core here; lossless_kernels.py). The torch decoder
below is the reference and the accelerator's; both write the same bits.

This is what the `bf16z` pack stores (flash/pack.py): a quarter fewer bytes read from disk per
token than a bf16 pack, for a decode on the compute device that the cost model prices.

Shape legend: n elements of a tensor (row-major), m escapes.
"""

import threading

import numpy as np
import torch

CODEC = "exp4"
BLOCK = 32  # weights per planar code block
WINDOW = 15  # exponents a code can name (codes 1..15)
MAX_SHARE = 0.9  # compress a tensor only if it then takes at most this share of its bfloat16 bytes
ESCAPE_GUESS = 1e-3  # escapes per weight assumed when the weights are not at hand (planning from a config)


def eligible(shape, floating: bool) -> bool:
    """A tensor the codec takes: a float matrix whose rows are whole blocks, addressable with int32."""
    n = int(np.prod(shape)) if shape else 0
    return floating and len(shape) == 2 and shape[-1] % BLOCK == 0 and 0 < n < 2**31


def stored_bytes(n: int, escapes: int) -> int:
    """Bytes of the three pieces (without alignment) of an n-element tensor with `escapes` escapes."""
    return n + n // 2 + 5 * escapes


def guess_escapes(n: int) -> int:
    return int(np.ceil(n * ESCAPE_GUESS))


# ------------------------------------------------------------------ encoding (packing)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t (any float dtype) -> its bfloat16 bit patterns as int32 in [0, 65535], flattened."""
    return t.to(torch.bfloat16).reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF


def exponent_histogram(t: torch.Tensor) -> np.ndarray:
    """[256] counts of the bfloat16 exponents of t's elements (accumulate over row chunks, then choose())."""
    return np.bincount(((_bits(t) >> 7) & 0xFF).numpy(), minlength=256)


def choose(hist: np.ndarray) -> tuple[int, int]:
    """(base, escapes): the window base+1..base+15 holding the most nonzero exponents, and what it leaves out."""
    h = np.asarray(hist, dtype=np.int64).copy()
    h[0] = 0  # exponent 0 is code 0 itself
    window = np.convolve(h[1:], np.ones(WINDOW, dtype=np.int64), mode="valid")  # [241]: sums of h[b+1 : b+16]
    base = int(np.argmax(window))
    return base, int(h.sum() - window[base])


def worth_it(n: int, escapes: int) -> bool:
    return stored_bytes(n, escapes) <= MAX_SHARE * 2 * n


def encode(t: torch.Tensor, base: int, first: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Encode a chunk of whole blocks: t [rows, C] -> (lo [n] uint8, codes [n/2] uint8, escape positions
    [m] uint32 counted from `first` (the chunk's first element in its tensor), escape exponents [m] uint8)."""
    b = _bits(t)
    e = (b >> 7) & 0xFF
    lo = (((b >> 8) & 0x80) | (b & 0x7F)).to(torch.uint8)
    c = e - base
    inside = (c >= 1) & (c <= WINDOW)
    c = torch.where(inside, c, 0).to(torch.uint8).reshape(-1, BLOCK)
    codes = c[:, :BLOCK // 2] | (c[:, BLOCK // 2:] << 4)
    esc = torch.nonzero(~inside & (e != 0)).reshape(-1)
    return (lo.numpy(), codes.reshape(-1).numpy(), (esc + first).numpy().astype(np.uint32),
            e[esc].to(torch.uint8).numpy())


# ------------------------------------------------------------------ decoding


def decode_torch(lo: torch.Tensor, codes: torch.Tensor, base: int, pos: torch.Tensor, exps: torch.Tensor,
                 shape, dtype: torch.dtype, out: torch.Tensor | None = None, chunk: int = 2**20) -> torch.Tensor:
    """The reference decoder (and the accelerator's): pieces as uint8 tensors on one device (pos as
    int32) -> the tensor of `shape` in `dtype`. Works `chunk` elements at a time, so its int32
    temporaries stay a few MB whatever the tensor's size."""
    n = lo.numel()
    out = torch.empty(shape, dtype=dtype, device=lo.device) if out is None else out
    flat = out.view(-1)
    for a in range(0, n, chunk):  # chunk is a multiple of BLOCK
        z = min(n, a + chunk)
        c = codes[a // 2:z // 2].reshape(-1, BLOCK // 2).to(torch.int32)
        c = torch.cat([c & 15, c >> 4], dim=1).reshape(-1)  # [z - a]: back in element order
        e = torch.where(c > 0, c + base, 0)
        l8 = lo[a:z].to(torch.int32)
        bits = ((l8 & 0x80) << 8) | (e << 7) | (l8 & 0x7F)
        sel = (pos >= a) & (pos < z)
        if sel.any():
            p = pos[sel].long() - a
            bits[p] = (bits[p] & 0x807F) | (exps[sel].to(torch.int32) << 7)
        flat[a:z] = _from_bits(bits, dtype)
    return out


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    signed = bits - ((bits >> 15) << 16)  # [-32768, 32767]: the int16 the bits spell
    if dtype == torch.float32:
        return (signed * 65536).view(torch.float32)  # a bfloat16 is the top half of its float32
    return signed.to(torch.int16).view(torch.bfloat16).to(dtype)


_kernels = None
_launch = threading.Lock()  # numba's workqueue threading layer must not be entered by two threads at once


def _numba_kernels():
    global _kernels
    if _kernels is None:
        try:
            from . import lossless_kernels

            _kernels = lossless_kernels
        except ImportError:
            from .reader import say_once

            say_once("numba-lossless", "numba is not installed; decoding bf16z weights with torch on the CPU (slower)")
            _kernels = False
    return _kernels


def decode(lo: torch.Tensor, codes: torch.Tensor, base: int, pos: torch.Tensor, exps: torch.Tensor, shape,
           dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The pieces (uint8 views of a read extent; pos int32) -> the tensor of `shape` in `dtype`, on their device.

    Args:
        out: an optional tensor of `shape` and `dtype` to write into (the caller's accounted buffer).
    """
    k = _numba_kernels() if lo.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) else False
    if not k:
        return decode_torch(lo, codes, base, pos, exps, shape, dtype, out)
    out = torch.empty(shape, dtype=dtype) if out is None else out
    ln, cn, pn, en = lo.numpy(), codes.numpy(), pos.numpy(), exps.numpy()
    with _launch:
        if dtype == torch.bfloat16:
            k.decode_into(ln, cn, base, pn, en, out.view(-1).view(torch.int16).numpy().view(np.uint16), 0)
        else:
            k.decode_into(ln, cn, base, pn, en, out.view(-1).view(torch.int32).numpy().view(np.uint32), 16)
    return out
