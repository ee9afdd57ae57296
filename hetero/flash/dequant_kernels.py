"""numba kernels of quant.dequantize on the CPU (imported only when numba is installed).

They live at module level, not in a function: numba's on-disk cache (cache=True) does not find
kernels defined in a closure again, so every process compiled them anew, ~200 MB of LLVM at its
first int8 layer (enough to push a process at its memory cgroup's limit over it).

Shape legend: R rows, C columns, G = C / gs groups per row.
"""

import numba
import numpy as np

ROWS_PER_TASK = 64  # rows one parallel task dequantizes: large enough to amortise scheduling


# Parallel over blocks of rows; each row goes in as 1-d views, and the inner loop runs a fixed
# group's length from a group's base: LLVM vectorizes that form, not q[r, c] over range(g*gs, ...).
# (That change made the kernels ~5x faster, bit for bit the same: benchmarks/ssd_bound.py's int8
# contender spent its whole decode step dequantizing before it.)
@numba.njit(fastmath=True, cache=True)
def row_f32(q, s, dst, bits, gs):  # q [C] or [C/2], s [G] -> dst [C] float32
    if bits == 8:
        for g in range(s.shape[0]):
            sc, base = s[g], g * gs
            for c in range(gs):
                dst[base + c] = np.float32(q[base + c]) * sc
    else:
        half = gs // 2
        for g in range(s.shape[0]):
            sc, base = s[g], g * half
            for i in range(half):
                byte = np.int32(q[base + i])
                dst[2 * (base + i)] = np.float32((byte & 15) - 8) * sc
                dst[2 * (base + i) + 1] = np.float32((byte >> 4) - 8) * sc


@numba.njit(fastmath=True, cache=True, parallel=True)
def to_f32(q, s, out, bits, gs):
    R = out.shape[0]
    for blk in numba.prange((R + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(blk * ROWS_PER_TASK, min(R, blk * ROWS_PER_TASK + ROWS_PER_TASK)):
            row_f32(q[r], s[r], out[r], bits, gs)


@numba.njit(fastmath=True, cache=True, parallel=True)
def to_bf16(q, s, out, bits, gs):  # out: uint16 bit patterns of bfloat16, rounded to nearest even
    R, C = out.shape
    for blk in numba.prange((R + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row = np.empty(C, np.float32)
        b = row.view(np.uint32)
        for r in range(blk * ROWS_PER_TASK, min(R, blk * ROWS_PER_TASK + ROWS_PER_TASK)):
            row_f32(q[r], s[r], row, bits, gs)
            o = out[r]
            for c in range(C):
                x = b[c]
                o[c] = np.uint16((x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
