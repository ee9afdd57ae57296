"""The 4-bit V copy: rows come back within half a quantization step of their own scale, by id, across growth."""

import numpy as np
import torch

from hetero.kvstore.int4rows import LEVELS, Int4Rows


def test_rows_come_back_within_half_a_step_by_id_across_growth():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 1500, 65, generator=g) * torch.rand(3, 1500, 1, generator=g) * 10  # odd D, scales vary
    rows[1, 7] = 0  # an all-zero row must not divide by zero
    store = Int4Rows(3, 65)
    for a in range(0, 1500, 300):  # past the first capacity (1024): the arrays grow
        store.add(rows[:, a:a + 300].to(torch.bfloat16))
    ids = np.random.default_rng(1).integers(0, 1500, (3, 40))
    ids[1, 0] = 7
    got = store.gather(ids)
    want = rows.to(torch.bfloat16).float()[torch.arange(3)[:, None], torch.from_numpy(ids)]
    step = want.abs().amax(-1, keepdim=True) / LEVELS
    assert got.shape == (3, 40, 65)
    assert ((got - want).abs() <= step / 2 + 1e-6).all()
    assert (got[1, 0] == 0).all()
    assert (got - want).abs().max() > 0  # it is a lossy copy, not the rows themselves
    assert store.nbytes() == 3 * 1500 * (33 + 4)
