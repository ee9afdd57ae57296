"""A 4-bit copy of the V rows retrieval attention keeps in RAM beside its index.

Retrieval scores every key its index scans exactly, but only the best few per query head are worth
their exact V row (a disk read when the block lives on disk). The other scanned keys still carry
much of a flat head's softmax mass; attending to them with 4-bit V rows keeps that mass at an eighth
of the float32 bytes. Each row is quantized symmetrically with its own scale (absmax / 7), two
values per byte.

Shape legend: h heads (sequences x kv heads), n rows per head, D head dim, C rows gathered per head.
"""

import numpy as np
import torch

LEVELS = 7  # codes -7..7, stored as 1..15 in a nibble


class Int4Rows:
    """Rows [h, n, D] appended block by block, gathered back (dequantized) by id."""

    def __init__(self, heads: int, dim: int):
        self.h, self.dim = heads, dim
        self.half = (dim + 1) // 2
        self.codes = torch.empty(heads, 0, self.half, dtype=torch.uint8)  # [h, capacity, ceil(D/2)]
        self.scales = torch.empty(heads, 0, dtype=torch.float32)  # [h, capacity]
        self.n = 0

    def add(self, rows: torch.Tensor):
        """Append rows [h, b, D] (any float dtype); they get ids n, n+1, ... in every head."""
        rows = rows.float()
        b = rows.shape[1]
        if self.n + b > self.codes.shape[1]:
            cap = max(2 * self.codes.shape[1], self.n + b, 1024)
            codes = torch.empty(self.h, cap, self.half, dtype=torch.uint8)
            scales = torch.empty(self.h, cap, dtype=torch.float32)
            codes[:, :self.n], scales[:, :self.n] = self.codes[:, :self.n], self.scales[:, :self.n]
            self.codes, self.scales = codes, scales
        scale = rows.abs().amax(-1).clamp_min(1e-30) / LEVELS  # [h, b]
        q = (torch.round(rows / scale[..., None]).clamp(-LEVELS, LEVELS) + LEVELS + 1).to(torch.uint8)  # 1..15
        if self.dim % 2:
            q = torch.cat([q, torch.full_like(q[..., :1], LEVELS + 1)], -1)
        self.codes[:, self.n:self.n + b] = q[..., 0::2] | (q[..., 1::2] << 4)
        self.scales[:, self.n:self.n + b] = scale
        self.n += b

    def gather(self, ids: np.ndarray) -> torch.Tensor:
        """Rows [h, C, D] float32 of ids [h, C] (each head its own ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        return self._rows(ids + np.arange(self.h)[:, None] * self.codes.shape[1]).view(self.h, ids.shape[1], self.dim)

    def rows(self, head: int, ids: np.ndarray) -> torch.Tensor:
        """Rows [N, D] float32 of one head's ids [N]."""
        return self._rows(np.asarray(ids, dtype=np.int64) + head * self.codes.shape[1])

    def _rows(self, flat: np.ndarray) -> torch.Tensor:
        """Rows [N, D] at flat positions [...] of the store [h * capacity]: one index_select, far faster
        than a 2-d gather."""
        flat = torch.from_numpy(np.ascontiguousarray(flat).ravel())
        packed = self.codes.view(-1, self.half).index_select(0, flat)  # [N, ceil(D/2)]
        q = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)[..., :self.dim]  # [N, D]
        return (q.float() - (LEVELS + 1)) * self.scales.view(-1).index_select(0, flat)[:, None]

    def nbytes(self) -> int:
        return self.h * self.n * (self.half + 4)
