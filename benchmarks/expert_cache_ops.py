"""What one expert-cache miss costs the compute thread in the score policy's victim choice, by cache size.

    python benchmarks/expert_cache_ops.py [--repeats 300]

The score policy (hetero/experts/policy.py) ranks every resident, unprotected expert at every miss.
Its two implementations, the inlined Python loop and the numpy ranking, run in turn on the same
state: a policy that has seen 50 token steps of 8-of-128 routing over 48 MoE layers (the shape of
Qwen3-30B-A3B), asked for a victim among caches of 48 to 1843 slots (1843 = 30% of its experts),
with 40 protected keys. Both must choose the same victim (checked here, and in
tests/test_expert_cache.py); the table prints microseconds per choice and their ratio.
VECTOR_MIN is the size from which victim() takes the numpy path.
"""

import argparse
import random
import statistics
import time

from hetero.experts import policy

LAYERS, EXPERTS, TOP_K, STEPS = 48, 128, 8, 50
SIZES = (48, 96, 144, 576, 1843)


def trained_policy():
    p = policy.make_policy("score", layers=list(range(LAYERS)))
    rng = random.Random(0)
    for _ in range(STEPS):
        for layer in range(LAYERS):
            for e in rng.sample(range(EXPERTS), TOP_K):
                p.touch((layer, e), rng.random() / TOP_K)
        p.tick()
    return p


def per_call(fn, repeats: int) -> float:
    """Median of 5 batches of seconds per call."""
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.append((time.perf_counter() - t0) / repeats)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    p = trained_policy()
    keys = [(l, e) for l in range(LAYERS) for e in range(EXPERTS)]
    rng = random.Random(1)
    print(f"score policy victim choice, {LAYERS} MoE layers x {EXPERTS} experts; VECTOR_MIN = {policy.VECTOR_MIN}")
    print(f"{'slots':>6}{'loop us':>10}{'numpy us':>10}{'loop / numpy':>14}")
    for n in SIZES:
        resident = rng.sample(keys, n)
        protected = set(rng.sample(resident, min(40, n // 2)))
        loop = p._victim_loop(resident, protected)
        saved = policy.VECTOR_MIN
        policy.VECTOR_MIN = 0
        try:
            assert p.victim(resident, protected) == loop, "the two rankings disagree"
            vec = per_call(lambda: p.victim(resident, protected), args.repeats)
        finally:
            policy.VECTOR_MIN = saved
        lp = per_call(lambda: p._victim_loop(resident, protected), args.repeats)
        print(f"{n:>6}{1e6 * lp:>10.0f}{1e6 * vec:>10.0f}{lp / vec:>13.2f}x")


if __name__ == "__main__":
    main()
