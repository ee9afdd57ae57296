"""numba kernels of lossless.decode on the CPU (imported only when numba is installed).

Module level, cache=True, as dequant_kernels.py, so numba's disk cache finds them again.

Each planar block of 32 weights is 16 code bytes and 32 lo bytes in, 32 words out, all contiguous:
the fixed 16-lane inner loop, with the exponent as arithmetic (no table), is what LLVM vectorizes
(~9 GB/s of bfloat16 out per core here, faster than a memcpy of the result). Escapes are patched
after, serially: there are about 10^-4 of them.

Shape legend: n elements, m escapes; lo [n], codes [n/2], pos [m], exps [m], out [n].
"""

import numba
import numpy as np

BLOCKS_PER_TASK = 2048  # 64K weights per parallel task: large enough to amortise scheduling


@numba.njit(fastmath=True, cache=True, inline="always")
def _word(l8, c, base7):  # one weight's bfloat16 bits from its lo byte and 4-bit code
    l = np.uint16(l8)
    e = np.uint16(0) if c == 0 else (np.uint16(c) << np.uint16(7)) + base7
    return ((l & np.uint16(0x80)) << np.uint16(8)) | e | (l & np.uint16(0x7F))


# One kernel for both outputs: numba compiles it once per `out` dtype (uint16: bfloat16 bits, shift 0;
# uint32: float32 bits, shift 16, since a bfloat16 is the top half of its float32).
@numba.njit(fastmath=True, cache=True, parallel=True)
def decode_into(lo, codes, base, pos, exps, out, shift):
    nb = out.shape[0] // 32
    base7 = np.uint16(base) << np.uint16(7)
    sh = np.uint32(shift)
    for t in numba.prange((nb + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        for b in range(t * BLOCKS_PER_TASK, min(nb, t * BLOCKS_PER_TASK + BLOCKS_PER_TASK)):
            cb, lb, ob = codes[16 * b:16 * b + 16], lo[32 * b:32 * b + 32], out[32 * b:32 * b + 32]
            for i in range(16):
                c = cb[i]
                ob[i] = np.uint32(_word(lb[i], c & np.uint8(15), base7)) << sh
                ob[16 + i] = np.uint32(_word(lb[16 + i], c >> np.uint8(4), base7)) << sh
    keep = np.uint32(0x807F) << sh
    for j in range(pos.shape[0]):
        p = pos[j]
        out[p] = (np.uint32(out[p]) & keep) | (np.uint32(exps[j]) << (np.uint32(7) + sh))
