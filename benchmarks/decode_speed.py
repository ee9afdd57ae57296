"""Decode speed of SmolLM2-135M fully in RAM: hetero vs transformers' generate, in the same run.

    python benchmarks/decode_speed.py [--tokens 64] [--repeats 3] [--dtype float32]

Decode time per token = (time to generate N tokens - time to generate 1 token) / (N - 1), so the
prompt's prefill is excluded for both. Prints a table and writes benchmarks/results/decode_speed.json.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_s_per_token(generate, n, repeats):
    one = timed(lambda: generate(1), repeats)
    full = timed(lambda: generate(n), repeats)
    return (full - one) / (n - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    import hetero
    from hetero import store
    from transformers import AutoModelForCausalLM

    path = store.resolve("smollm2")
    dtype = getattr(torch, args.dtype)
    ours = hetero.load_offloaded(path, dtype=args.dtype)
    ids = torch.tensor([ours.encode_prompt(PROMPT)])
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def gen_ours(n):
        ours.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    @torch.inference_mode()
    def gen_ref(n):
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     pad_token_id=0)

    gen_ours(4), gen_ref(4)  # warm up
    results = {}
    for name, fn in (("hetero", gen_ours), ("transformers", gen_ref)):
        s = decode_s_per_token(fn, args.tokens, args.repeats)
        results[name] = {"decode_s_per_token": s, "decode_tokens_per_s": 1 / s}
    ratio = results["hetero"]["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"]
    print(f"SmolLM2-135M {args.dtype}, all weights in RAM, {args.tokens} tokens, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'contender':<14}{'tokens/s':>10}{'ms/token':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['decode_tokens_per_s']:>10.2f}{1000 * r['decode_s_per_token']:>10.2f}")
    print(f"hetero / transformers: {ratio:.2f}x")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "decode_speed.json").write_text(json.dumps(
        {"dtype": args.dtype, "tokens": args.tokens, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
         "results": results, "ratio_hetero_over_transformers": ratio}, indent=1))


if __name__ == "__main__":
    main()
