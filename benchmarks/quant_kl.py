"""How much do int8 / int4 packs change the model? Mean KL of next-token distributions vs unquantized.

Every group but the norms is placed on disk, so every weight matrix is read from the pack under
test (a quantized pack applies to disk-tier groups). The reference is the same model read from a
lossless pack in the checkpoint's dtype. Prints a table and writes JSON.

    python benchmarks/quant_kl.py [--model smollm2] [--json benchmarks/results/quant_kl.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import hetero
from hetero.placement.plan import Plan

TEXT = """The history of the printing press begins in the fifteenth century, when Johannes Gutenberg
combined a screw press with movable metal type, oil-based ink and a mould for casting letters in
quantity. Books that had taken a scribe months to copy could now be produced in days, and the price
of the written word fell sharply. Within fifty years presses were working in more than two hundred
cities across Europe. Scholars argue about how much the new technology changed the world, but few
doubt that it helped spread the ideas of the Renaissance, the Reformation and the scientific
revolution. Printers standardised spelling, grammar and the layout of pages; they invented the
title page, page numbers and the index. Newspapers followed in the seventeenth century, and with
them a public that expected to be informed about events far away. Today a similar debate surrounds
the internet and machine learning: whether they are tools that extend what people already do, or
forces that reshape how knowledge is made and shared. Def fibonacci(n): return n if n < 2 else
fibonacci(n - 1) + fibonacci(n - 2). The capital of France is Paris, and the capital of Japan is Tokyo."""


def all_disk_plan(model) -> Plan:
    tiers = {g.name: ("cpu" if g.kind == "norms" else "disk") for g in model.groups}
    return Plan(tiers=tiers, compute="cpu", budgets={}, kv_tokens=1024)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a model directory, store name or catalogue name")
    ap.add_argument("--packs", default="int8,int4,int4-g32,bf16", help="pack dtypes to compare")
    ap.add_argument("--json", dest="json_path", default="benchmarks/results/quant_kl.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    base = hetero.load_offloaded(a.model, ram=None, log_fn=lambda *_: None)
    plan = all_disk_plan(base)
    ids = torch.tensor([base.tokenizer.encode(TEXT)])
    ref_model = hetero.load_offloaded(base.path, plan=plan, log_fn=lambda *_: None)  # lossless pack
    with torch.inference_mode():
        ref = torch.log_softmax(ref_model(ids).logits.float(), -1)[0]  # [T, V]
    rows = []
    for fmt in a.packs.split(","):
        m = hetero.load_offloaded(base.path, plan=plan, pack=fmt, log_fn=lambda *_: None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            got = torch.log_softmax(m(ids).logits.float(), -1)[0]
        kl = (ref.exp() * (ref - got)).sum(-1)  # KL(reference || quantized) per position
        top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        rows.append({"pack": m.executor.store.pack.format.tag, "mean_kl": kl.mean().item(), "max_kl": kl.max().item(),
                     "top1_agreement": top1, "disk_bytes": m.stats()["prefill_disk_read_bytes_per_token"] * ids.shape[1],
                     "forward_s": time.perf_counter() - t0})
    ref_bytes = ref_model.stats()["prefill_disk_read_bytes_per_token"] * ids.shape[1]
    print(f"model {base.path.name}, {ids.shape[1]} tokens, reference: {ref_model.executor.store.pack.format.tag} pack "
          f"({ref_bytes / 2**20:.1f} MiB read per forward)")
    print(f"{'pack':10} {'mean KL':>10} {'max KL':>10} {'top-1 agree':>12} {'bytes vs ref':>13}")
    for r in rows:
        print(f"{r['pack']:10} {r['mean_kl']:10.5f} {r['max_kl']:10.4f} {100 * r['top1_agreement']:11.1f}% "
              f"{r['disk_bytes'] / ref_bytes:13.3f}")
    out = {"model": str(base.path), "tokens": ids.shape[1], "reference": ref_model.executor.store.pack.format.tag,
           "reference_disk_bytes": ref_bytes, "results": rows, "target_int8_mean_kl": 0.01}
    Path(a.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json_path).write_text(json.dumps(out, indent=1))
    int8 = next((r for r in rows if r["pack"].startswith("int8")), None)
    if int8 is not None and int8["mean_kl"] > 0.01:
        print(f"int8 mean KL {int8['mean_kl']:.4f} is above the 0.01 target", file=sys.stderr)


if __name__ == "__main__":
    main()
