"""What the routing predictor costs per MoE layer of a decoded token: all later layers scored in one
pass (RoutingPredictor.predict, as the expert manager calls it) against each depth scored alone.

On the trained MoE fixture of plan_accuracy.py / moe_offload.py (30 layers, 16 experts, top-4, its
calibrated predictor beside it, built once), for lookaheads 1-3, with one decoded token's MoE input
(held-out tokens' hidden states are not needed: the cost does not depend on the values). Both ways
are checked to give the same scores, then timed in turns; median of --rounds sweeps over every MoE
layer.

    python benchmarks/predictor_cost.py [--rounds 30]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()

    import plan_accuracy
    from hetero.experts.predictor import any_token_probability, checkpoint_routers, load_predictor

    path = plan_accuracy.trained_moe()
    args, routers = checkpoint_routers(path)
    torch.set_num_threads(2)
    x = torch.randn(1, args.hidden_size, generator=torch.Generator().manual_seed(0))  # one decoded token
    print(f"{path.name}: {len(routers)} MoE layers, {args.num_experts} experts, top-{args.num_experts_per_tok}")
    print(f"{'lookahead':>9s} {'predictor':>11s} {'one pass us':>12s} {'each depth us':>14s} {'ratio':>6s}")
    for L in (1, 2, 3):
        p = load_predictor(path, routers, args.num_experts_per_tok, L)
        layers = sorted(routers)

        def each(layer):
            out = {}
            for d in range(1, L + 1):
                s = p.token_scores(layer, d, x)
                if s is not None:
                    out[layer + d] = any_token_probability(s)
            return out

        for layer in layers:  # the same scores both ways
            got, want = p.predict(layer, x), each(layer)
            assert list(got) == list(want) and all(torch.allclose(got[t], want[t], atol=1e-6) for t in got)
        times = {"one pass": [], "each depth": []}
        for _ in range(a.rounds):
            for name, fn in (("one pass", lambda layer: p.predict(layer, x)), ("each depth", each)):
                t0 = time.perf_counter()
                for layer in layers:
                    fn(layer)
                times[name].append((time.perf_counter() - t0) / len(layers))
        one, sep = (statistics.median(times[k]) * 1e6 for k in ("one pass", "each depth"))
        print(f"{L:9d} {p.kind:>11s} {one:12.0f} {sep:14.0f} {sep / one:5.2f}x")


if __name__ == "__main__":
    main()
