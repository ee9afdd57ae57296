"""The bf16z codec on real weights: bytes per weight, escapes, decode speed, and that it is lossless.

For every weight matrix of SmolLM2-135M-Instruct's layers (real weights, the catalogue model) and of a
generated Gaussian matrix, it encodes with flash/lossless.py exactly as a bf16z pack does, decodes
with the numba kernel and the torch reference, checks both give back every bit, and prints bits per
weight and escapes per weight. Then decode throughput on one 64 MiB (bf16) matrix: numba into
bfloat16 and float32, the torch reference, and a memcpy of the result for scale, each the median of
rounds of the same call.

    python benchmarks/lossless_ratio.py [--model smollm2] [--threads 2]
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from safetensors import safe_open

from hetero import store
from hetero.flash import lossless


def _pieces(w: torch.Tensor):
    base, _ = lossless.choose(lossless.exponent_histogram(w))
    lo, codes, pos, exps = lossless.encode(w, base)
    return [torch.from_numpy(lo), torch.from_numpy(codes), base, torch.from_numpy(pos.view(np.int32)),
            torch.from_numpy(exps)]


def ratio(tensors) -> dict:
    """Stored bytes and escapes over the matrices the codec takes; checks both decoders are exact."""
    n = stored = escapes = skipped = 0
    for w in tensors:
        if not lossless.eligible(tuple(w.shape), w.is_floating_point()):
            skipped += w.numel()
            continue
        want = w.to(torch.bfloat16).view(torch.int16)
        p = _pieces(w)
        for decode in (lossless.decode, lossless.decode_torch):
            got = decode(*p, tuple(w.shape), torch.bfloat16)
            assert torch.equal(got.view(torch.int16), want), "the codec lost a bit"
        n += w.numel()
        escapes += len(p[3])
        stored += lossless.stored_bytes(w.numel(), len(p[3]))
    return {"weights": n, "bits_per_weight": 8 * stored / max(1, n), "escapes_per_weight": escapes / max(1, n),
            "share_of_bf16_bytes": stored / max(1, 2 * n), "weights_not_coded": skipped}


def _median_s(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(rows: int = 8192, cols: int = 4096) -> dict:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    p = _pieces(w)
    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        buf = torch.empty(rows, cols, dtype=dtype)
        s = _median_s(lambda: lossless.decode(*p, (rows, cols), dtype, out=buf))
        out[f"numba -> {name} GB/s of output"] = buf.nbytes / s / 1e9
    buf = torch.empty(rows, cols, dtype=torch.bfloat16)
    s = _median_s(lambda: lossless.decode_torch(*p, (rows, cols), torch.bfloat16, out=buf), rounds=3)
    out["torch reference -> bfloat16 GB/s of output"] = buf.nbytes / s / 1e9
    dst = torch.empty_like(buf)
    s = _median_s(lambda: dst.copy_(buf))
    out["memcpy of the bfloat16 result GB/s"] = buf.nbytes / s / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a model in the store (or an HF directory) with safetensors")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = store.resolve(a.model)
    mats = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:  # as a bf16z pack: embed and lm_head (read by rows) stay plain
            mats += [sf.get_tensor(k) for k in sf.keys() if "embed_tokens" not in k and "lm_head" not in k]
    res = {"model": ratio(mats),
           "gaussian": ratio([torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)) * 0.02]),
           "speed": speed()}
    for name in ("model", "gaussian"):
        r = res[name]
        label = a.model if name == "model" else "Gaussian 4096x4096 (std 0.02)"
        print(f"{label}: {r['weights'] / 1e6:.1f}M weights coded, {r['bits_per_weight']:.3f} bits a weight "
              f"({100 * r['share_of_bf16_bytes']:.2f}% of bf16), {r['escapes_per_weight'] * 1e4:.2f} escapes per 10^4 "
              f"weights; {r['weights_not_coded'] / 1e6:.1f}M weights left plain; both decoders bit-exact")
    for k, v in res["speed"].items():
        print(f"{k}: {v:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
