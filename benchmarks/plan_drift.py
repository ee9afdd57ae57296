"""How much of the cost model's error is the machine drifting? Predict and measure one plan, again and again.

    python benchmarks/plan_drift.py [--model moe|dense|smollm2] [--rounds 4] [--tokens 8]

One process loads one model with everything in RAM (no disk reads, so only compute speed matters)
and, each round: measures this moment's decode matvec, its fixed cost per call and the family's
overheads again (plan_accuracy.compute_now), predicts the plan's decode time per token with those
figures, then decodes --tokens tokens and takes the median. On a quiet, steady machine the two
columns move together; on a shared host the measured one jumps while the plan and the process stay
the same. The models are plan_accuracy.py's (the MoE is the trained fixture widened 16x).

Each round also splits both figures in two: the matrix-vector products (predicted: the plan with
every family overhead set to zero, so the weights' matvecs, lm_head and the KV reads; measured: the
time spent inside models.common.linear and the lm_head call) and the rest (norms, RoPE, attention,
routing, the dispatch loop, the executor). That shows which part of the model is off.
Writes benchmarks/results/plan_drift.json.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_accuracy  # noqa: E402  (its model builders, token streams and compute_now)


def matvec_timer(m) -> list:
    """Times the matvecs of every forward of `m` from now on: appends, per forward, the seconds spent in
    models.common.linear (every weight matrix) and in the lm_head call, to the list returned."""
    import hetero.models.common as common

    inside, out = [0.0], []
    linear, logits, forward = common.linear, m.executor.store.logits, m.executor.forward

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t0
        return run

    def counted_forward(*a, **k):
        inside[0] = 0.0
        try:
            return forward(*a, **k)
        finally:
            out.append(inside[0])

    common.linear, m.executor.store.logits, m.executor.forward = timed(linear), timed(logits), counted_forward
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moe", choices=["moe", "dense", "smollm2"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()

    import hetero
    from hetero import store
    from hetero.placement import hardware
    from hetero.placement.cost import Workload, predict
    from hetero.placement.describe import describe_dir

    path = {"moe": plan_accuracy.trained_moe, "smollm2": lambda: store.resolve("smollm2"),
            "dense": lambda: plan_accuracy.generated("dense")}[args.model]()
    desc = describe_dir(path)
    profile = hardware.get_profile(log=lambda m: print(m, file=sys.stderr))
    m = hetero.load_offloaded(path, ram=2 * desc.total_bytes, log_fn=lambda *_: None)
    stream = plan_accuracy.token_stream(args.model, path, plan_accuracy.PROMPT_TOKENS + args.tokens)
    workload = Workload(prompt_tokens=plan_accuracy.PROMPT_TOKENS, new_tokens=args.tokens)
    per_forward = matvec_timer(m)
    rows = []
    for rnd in range(args.rounds):
        now = replace(profile, compute=plan_accuracy.compute_now(profile, desc))
        pred = predict(desc, m.plan, now, workload).decode_s_per_token
        cpu = dict(now.compute["cpu"], overheads={k: {p: 0.0 for p in v} for k, v in now.compute["cpu"]["overheads"].items()})
        pred_mv = predict(desc, m.plan, replace(now, compute={**now.compute, "cpu": cpu}), workload).decode_s_per_token
        per_forward.clear()
        times, _ = plan_accuracy.decode_times(m, path, stream, args.tokens)
        meas, meas_mv = statistics.median(times), statistics.median(per_forward[-args.tokens:])
        rows.append({"round": rnd + 1, "predicted_s": pred, "measured_s": meas, "error": pred / meas - 1,
                     "predicted_matvec_s": pred_mv, "measured_matvec_s": meas_mv, "at": time.strftime("%H:%M:%S")})
        print(f"round {rnd + 1}: predicted {1e3 * pred:.1f} ms, measured {1e3 * meas:.1f} ms "
              f"({100 * (pred / meas - 1):+.1f}%); matvec {1e3 * pred_mv:.1f} / {1e3 * meas_mv:.1f} ms, "
              f"the rest {1e3 * (pred - pred_mv):.1f} / {1e3 * (meas - meas_mv):.1f} ms", flush=True)
    errs = [abs(r["error"]) for r in rows]
    split = [(r["predicted_matvec_s"] / r["measured_matvec_s"] - 1,
              (r["predicted_s"] - r["predicted_matvec_s"]) / (r["measured_s"] - r["measured_matvec_s"]) - 1) for r in rows]
    print(f"matvec error median {100 * statistics.median(e for e, _ in split):+.1f}%, "
          f"the rest's {100 * statistics.median(e for _, e in split):+.1f}%")
    meas = [r["measured_s"] for r in rows]
    print(f"{args.model}, all in RAM, torch threads {torch.get_num_threads()}: measured {1e3 * min(meas):.1f}-"
          f"{1e3 * max(meas):.1f} ms/token over {args.rounds} rounds of the same plan in one process; "
          f"|error| median {100 * statistics.median(errs):.1f}%, worst {100 * max(errs):.1f}%")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "plan_drift.json").write_text(json.dumps({"model": args.model, "tokens": args.tokens, "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
