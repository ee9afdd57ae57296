"""Decoding a model bigger than the memory limit: hetero vs llama.cpp vs accelerate, and the disk bound.

One command: generates (once) a dense Llama-architecture model of ~2.3 GB with random bf16 weights
(speed does not depend on the values), its GGUF (same weights, tokenizer metadata from SmolLM2's
GGUF), hetero packs (bf16 and int8), then decodes with each contender in a Linux memory cgroup (v1)
limited to --limit-share of the model's size — the page cache charged to it too — with the page
cache dropped before each, the contenders taking --rounds turns (the median run of each is reported):

    hetero bf16     load_offloaded(ram=limit - interpreter overhead), the bf16 pack, prefetch pipeline
    hetero bf16z    the same reading a bf16z pack (the same weights, losslessly in 12 bits: 3/4 of the bytes)
    hetero int8     the same reading an int8 pack (half the bytes per token)
    llama.cpp       llama-cpp-python on the GGUF, default mmap loading (needs --llama-python)
    accelerate      transformers + accelerate, device_map="auto", max_memory, offload_folder

It prints tokens/s, the ratios, and hetero's ratio to the disk bound: bytes read from disk per
token ÷ the disk's direct-read bandwidth from `hetero profile`. Run as root (cgroup, drop_caches).

    python benchmarks/ssd_bound.py [--llama-python /work/bench-venv/bin/python] [--tokens 8] [--rounds 3]
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from harness import (accelerate_decode, accelerate_scratch, default_workdir, disk_bandwidth, emit, print_table, read_bytes,
                     reader_bandwidth, run_limited, smollm2_gguf, write_checkpoint, write_json)

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
              num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=49152,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, hidden_act="silu")
READER_TRIES = 3  # 1 GiB cold reads by hetero's reader alone, before the rounds and again after
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345]  # 8 token ids; the weights are random anyway


# ------------------------------------------------------------------ the model, its GGUF, its packs


def make_model(d: Path):
    import torch

    if (d / "model.safetensors.index.json").is_file():
        return
    c = CONFIG
    C, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    KV = C // c["num_attention_heads"] * c["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def shards():  # the embedding, five layers per shard, the head: one shard in memory at a time
        yield {"model.embed_tokens.weight": w(V, C)}
        shard = {}
        for l in range(L):
            p = f"model.layers.{l}."
            if l % 5 == 0 and shard:
                yield shard
                shard = {}
            shard.update({p + "self_attn.q_proj.weight": w(C, C), p + "self_attn.k_proj.weight": w(KV, C),
                          p + "self_attn.v_proj.weight": w(KV, C), p + "self_attn.o_proj.weight": w(C, C),
                          p + "mlp.gate_proj.weight": w(I, C), p + "mlp.up_proj.weight": w(I, C),
                          p + "mlp.down_proj.weight": w(C, I),
                          p + "input_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
                          p + "post_attention_layernorm.weight": torch.ones(C, dtype=torch.bfloat16)})
        yield shard
        yield {"model.norm.weight": torch.ones(C, dtype=torch.bfloat16), "lm_head.weight": w(V, C)}

    write_checkpoint(d, c, shards())


def make_gguf(model: Path, out: Path, work: Path):
    """The same weights as a bf16 GGUF (q/k rows permuted as llama.cpp's converter does)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    if out.is_file():
        return
    c = CONFIG
    tok = gguf.GGUFReader(str(smollm2_gguf(work)))
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


def worker_hetero(a) -> dict:
    import torch

    import hetero

    torch.set_num_threads(2)
    m = hetero.load_offloaded(a.model, ram=a.ram, pack=a.pack, context=256, dtype="bfloat16", log_fn=lambda *_: None)
    ids = torch.tensor([PROMPT])
    m.generate(ids, max_new_tokens=2, do_sample=False)  # first reads verify the pack's checksums
    m.reset_stats()
    r0, f0 = read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    m.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
    s = m.stats()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0
    return {"s_per_token": s["decode_s_per_token"], "disk_bytes_per_token": s["decode_disk_read_bytes_per_token"],
            # generate ran one prefill forward (reading the same weights) besides the decode steps
            "kernel_read_bytes_per_token": (read_bytes() - r0) / (s["decode_tokens"] + 1),
            # pages of code or data the memory limit evicted and the process read back (major faults)
            "major_faults_per_token": faults / (s["decode_tokens"] + 1),
            "read_gbps": s["decode_disk_read_gbps"], "io_stall_s_per_token": s["decode_io_stall_s_per_token"],
            "io_hidden_fraction": s["decode_io_hidden_fraction"], "resident_bytes": s["resident_bytes"],
            "peak_bytes": s["memory"]["cpu"]["peak_bytes"], "depth": s["io"]["prefetch_depth"],
            "reader": s["io"]["reader"], "direct_io": s["io"]["direct_io"], "pack": s["io"]["pack_dtype"],
            "predicted_s_per_token": s["predicted_decode_s_per_token"]}


def worker_llama(a) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=a.gguf, n_ctx=256, n_threads=2, n_batch=16, use_mmap=True, verbose=False)
    steps = []
    for warm in (True, False):
        r0 = read_bytes()
        llm.reset()
        last = None
        for i, _tok in enumerate(llm.generate(PROMPT, top_k=1, temp=0.0, reset=True)):
            now = time.perf_counter()
            if last is not None and not warm:
                steps.append(now - last)
            last = now
            if i + 1 >= (2 if warm else a.tokens + 1):
                break
    return {"s_per_token": sum(steps) / len(steps), "kernel_read_bytes_per_token": (read_bytes() - r0) / (len(steps) + 1)}


def worker_accelerate(a) -> dict:
    return accelerate_decode(a.model, a.ram, PROMPT, a.tokens, a.workdir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(default_workdir()))
    ap.add_argument("--tokens", type=int, default=8, help="decode steps timed per contender")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each contender, in turns; the median one is reported")
    ap.add_argument("--limit-share", type=float, default=0.4, help="memory limit as a share of the model's size")
    # 400 MiB: the int8 contender's process peaked at 845 MiB of anonymous memory (530 of it hetero's
    # accounted peak; numba adds ~36) and with 360 the cgroup's OOM killer took it one run in three
    ap.add_argument("--overhead", default=400 * 2**20, type=int,
                    help="bytes of the limit left to the interpreter, torch and activations (hetero --ram = limit - this)")
    ap.add_argument("--llama-python", default="/work/bench-venv/bin/python", help="a python with llama-cpp-python")
    ap.add_argument("--only", help="comma-separated contenders to run (hetero-bf16,hetero-bf16z,hetero-int8,llama.cpp,accelerate)")
    ap.add_argument("--json", dest="json_path", default="benchmarks/results/ssd_bound.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--ram", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pack", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fn = {"hetero": worker_hetero, "llama": worker_llama, "accelerate": worker_accelerate}[a.worker]
        emit(fn(a))
        return

    work = Path(a.workdir)
    model, gguf_path = work / "llama-2.3g", work / "llama-2.3g-bf16.gguf"
    work.mkdir(parents=True, exist_ok=True)
    print("preparing the model, its GGUF and packs (once) ...", file=sys.stderr)
    make_model(model)
    make_gguf(model, gguf_path, work)
    from hetero.api import pack_model
    from hetero.flash.pack import PackFormat, pack_path

    for dt in ("bf16", "bf16z", "int8"):
        if not (pack_path(model, PackFormat.parse(dt)) / "manifest.json").is_file():
            pack_model(model, dtype=dt, log_fn=lambda *_: None)
    import torch

    from hetero.flash import quant
    from hetero.placement import probes

    for bits in (8, 4):  # compile (and cache on disk) the decoding kernels outside the memory limit
        q, sc = quant.quantize(torch.randn(4, 128), bits, 64)
        for dt in (torch.bfloat16, torch.float32):
            quant.dequantize(q, sc, bits, 64, dt)
    probes.decompress("cpu", quick=True)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    limit = int(a.limit_share * size)
    bw, bw_source = disk_bandwidth(work, pack_path(model, PackFormat.parse("bf16")) / "weights.bin")
    # the profile may be old and the disk drifts: the reader alone is measured too, before and after the
    # rounds, and the bound is also given at the best of those (the bound no run can beat)
    weights = pack_path(model, PackFormat.parse("bf16")) / "weights.bin"
    reader_bws = [reader_bandwidth(weights) for _ in range(READER_TRIES)]
    print(f"disk: {bw / 1e9:.2f} GB/s ({bw_source}); hetero's reader: "
          f"{', '.join(f'{x / 1e9:.2f}' for x in reader_bws)} GB/s", file=sys.stderr)
    common = ["--model", str(model), "--tokens", str(a.tokens), "--workdir", str(work)]
    contenders = {
        "hetero-bf16": (["--worker", "hetero", "--pack", "bf16", "--ram", str(limit - a.overhead)], sys.executable, 900),
        "hetero-bf16z": (["--worker", "hetero", "--pack", "bf16z", "--ram", str(limit - a.overhead)], sys.executable, 900),
        "hetero-int8": (["--worker", "hetero", "--pack", "int8", "--ram", str(limit - a.overhead)], sys.executable, 900),
        "llama.cpp": (["--worker", "llama", "--gguf", str(gguf_path)], a.llama_python, 1800),
        "accelerate": (["--worker", "accelerate", "--ram", str(limit - a.overhead)], sys.executable, 1800),
    }
    only = set(a.only.split(",")) if a.only else set(contenders)
    runs = {}
    for r in range(a.rounds):  # the contenders take turns, so the disk's drift over minutes meets them alike
        for name, (argv, python, timeout) in contenders.items():
            if name not in only:
                continue
            if not Path(python).exists():
                runs[name] = [{"error": f"{python} not found"}]
                continue
            print(f"round {r + 1}/{a.rounds}: running {name} under a {limit / 2**20:.0f} MiB memory cgroup ...",
                  file=sys.stderr)
            runs.setdefault(name, []).append(run_limited(__file__, "hetero_ssd", name, argv + common, limit, python, timeout,
                                                         scratch=accelerate_scratch(work)))
    # what `hetero run` picks for this model and budget with no --pack (the lossless format predicted faster)
    from hetero.placement.summary import plan_command

    default = plan_command(str(model), ram=limit - a.overhead, context=256, dtype="bfloat16")[0]["pack"]
    reader_bws += [reader_bandwidth(weights) for _ in range(READER_TRIES)]
    report({name: median_run(rs) for name, rs in runs.items()}, size, limit, bw, bw_source, a, reader_bws, default)


def median_run(runs: list) -> dict:
    """A contender's run of median time per token (an error when none succeeded), with every round's time."""
    ok = sorted((r for r in runs if "s_per_token" in r), key=lambda r: r["s_per_token"])
    if not ok:
        return runs[-1]
    return {**ok[(len(ok) - 1) // 2], "rounds_s_per_token": [r.get("s_per_token") for r in runs],
            "failed_rounds": [r["error"] for r in runs if "error" in r]}


def report(results: dict, size: int, limit: int, bw: float, bw_source: str, a, reader_bws: list, default: str):
    best = max(reader_bws)
    print(f"\nmodel: dense llama, {size / 1e9:.2f} GB bf16; memory limit {limit / 2**20:.0f} MiB "
          f"({100 * a.limit_share:.0f}%, page cache included); disk {bw / 1e9:.2f} GB/s ({bw_source}); "
          f"hetero's reader alone {min(reader_bws) / 1e9:.2f}-{best / 1e9:.2f} GB/s ({READER_TRIES} reads of 1 GiB "
          f"before the rounds, {READER_TRIES} after); with no --pack, hetero reads a {default} pack here")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"]])
            continue
        r["tokens_per_s"] = 1 / r["s_per_token"]
        row = [name, f"{r['tokens_per_s']:.3f}", f"{r['s_per_token']:.2f}", f"{r['kernel_read_bytes_per_token'] / 1e9:.3f}"]
        if "disk_bytes_per_token" in r:
            r["disk_bound_s_per_token"] = r["disk_bytes_per_token"] / bw
            r["ratio_to_disk_bound"] = r["s_per_token"] / r["disk_bound_s_per_token"]
            row += [f"{r['disk_bytes_per_token'] / 1e9:.3f}", f"{r['disk_bound_s_per_token']:.2f}",
                    f"{r['ratio_to_disk_bound']:.2f}", f"{100 * (r['io_hidden_fraction'] or 0):.0f}%"]
        rows.append(row + [""] * (8 - len(row)))
    print_table(["contender", "tokens/s", "s/token", "kernel GB/tok", "GB read/token", "disk bound s", "÷ bound",
                 "hidden"], rows)
    ok = {k: r for k, r in results.items() if "tokens_per_s" in r}
    ratios = {}
    for h in ("hetero-bf16", "hetero-bf16z", "hetero-int8"):
        for other in ("llama.cpp", "accelerate"):
            if h in ok and other in ok:
                ratios[f"{h} / {other}"] = ok[h]["tokens_per_s"] / ok[other]["tokens_per_s"]
    for h in ("hetero-bf16z", "hetero-int8"):
        if "hetero-bf16" in ok and h in ok:
            ratios[f"{h[7:]} / bf16 bytes read per token"] = ok[h]["disk_bytes_per_token"] / ok["hetero-bf16"]["disk_bytes_per_token"]
    if "hetero-bf16" in ok and "hetero-bf16z" in ok:
        ratios["hetero-bf16z / hetero-bf16"] = ok["hetero-bf16z"]["tokens_per_s"] / ok["hetero-bf16"]["tokens_per_s"]
    for name, r in ok.items():
        if "disk_bytes_per_token" in r:
            r["ratio_to_reader_bound"] = r["s_per_token"] * best / r["disk_bytes_per_token"]
            ratios[f"{name} ÷ bound at the reader's best ({best / 1e9:.2f} GB/s)"] = r["ratio_to_reader_bound"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    for name, r in results.items():
        if len(r.get("rounds_s_per_token") or []) > 1:
            print(f"{name} s/token by round: " + ", ".join("failed" if t is None else f"{t:.2f}" for t in r["rounds_s_per_token"]))
    out = {"model_bytes": size, "limit_bytes": limit, "disk_bandwidth_bps": bw, "disk_bandwidth_source": bw_source,
           "default_pack": default,
           "reader_bandwidth_bps": reader_bws,
           "tokens": a.tokens, "results": results, "ratios": ratios}
    write_json(a.json_path, out)

if __name__ == "__main__":
    main()
