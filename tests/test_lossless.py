"""The lossless bfloat16 codec: every bit pattern back, both decoders alike, and the bytes it saves."""

import numpy as np
import pytest
import torch

from hetero.flash import lossless


def _pieces(w: torch.Tensor, base: int | None = None):
    if base is None:
        base, _ = lossless.choose(lossless.exponent_histogram(w))
    lo, codes, pos, exps = lossless.encode(w, base)
    return [torch.from_numpy(lo), torch.from_numpy(codes), base, torch.from_numpy(pos.view(np.int32)),
            torch.from_numpy(exps)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def test_every_bfloat16_bit_pattern_comes_back_from_both_decoders():
    # all 65536 patterns: zeros, subnormals, every exponent with both signs, infinities and NaNs
    w = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(2048, 32)
    args = _pieces(w)
    assert len(args[3]) > 60000  # most patterns lie outside any 15-exponent window: escapes
    for dtype in (torch.bfloat16, torch.float32):
        want = _bits(w.to(dtype))  # float32 of a bfloat16 is exact, NaN payloads included
        assert torch.equal(_bits(lossless.decode_torch(*args, w.shape, dtype)), want)
        assert torch.equal(_bits(lossless.decode(*args, w.shape, dtype)), want)  # numba
    # other dtypes go through bfloat16, as a plain bf16 pack converts
    half = lossless.decode(*args, w.shape, torch.float16)
    assert torch.equal(half.view(torch.int16), w.to(torch.float16).view(torch.int16))


@pytest.mark.parametrize("chunk", [32, 4096, 2**20])
def test_the_reference_decoder_patches_escapes_in_every_chunk(chunk):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[::7, ::5] *= 2.0 ** 40  # escapes spread over rows, blocks and chunk boundaries
    w[3, 31], w[3, 32] = 1e-30, -1e30
    args = _pieces(w)
    assert len(args[3]) > 300
    out = torch.full(w.shape, float("nan"), dtype=torch.bfloat16)
    lossless.decode_torch(*args, w.shape, torch.bfloat16, out=out, chunk=chunk)
    assert torch.equal(_bits(out), _bits(w.to(torch.bfloat16)))


def test_the_window_is_where_most_exponents_are():
    h = np.zeros(256, dtype=np.int64)
    h[0] = 10**6  # zeros are code 0, not in the window
    h[100:130] = 1
    h[110:125] += 1000
    base, escapes = lossless.choose(h)
    assert base == 109 and escapes == 30 - 15  # base + 1 .. base + 15 = 110 .. 124


def test_gaussian_weights_take_three_quarters_of_their_bytes():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    base, escapes = lossless.choose(lossless.exponent_histogram(w))
    assert escapes < 1e-3 * w.numel() and lossless.worth_it(w.numel(), escapes)
    assert 0.75 <= lossless.stored_bytes(w.numel(), escapes) / (2 * w.numel()) < 0.751
    spread = torch.exp2(torch.randint(-60, 60, (1024, 1024), generator=torch.Generator().manual_seed(3)).float())
    assert not lossless.worth_it(spread.numel(), lossless.choose(lossless.exponent_histogram(spread))[1])


def test_only_matrices_of_whole_blocks_are_coded():
    assert lossless.eligible((96, 64), True)
    assert not lossless.eligible((96, 48), True)  # rows are not whole 32-weight blocks
    assert not lossless.eligible((64,), True) and not lossless.eligible((96, 64), False)
