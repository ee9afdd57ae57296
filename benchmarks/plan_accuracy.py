"""Does the cost model predict decode speed, and is the planner's plan faster than the greedy one?

    python benchmarks/plan_accuracy.py [--tokens 8] [--rounds 2] [--models smollm2,dense,moe] [--no-refresh]
                                       [--wait-quiet SECONDS]

Models: SmolLM2-135M (float32, 540 MB, tied embeddings), a generated dense Llama of 1.4 GB (random
weights, made once with transformers' from_config into ~/.cache/hetero-bench) and, for the MoE, the
2.6 GB bf16 Mixtral-architecture model of moe_offload.py: the trained MoE fixture (routing learned
from real text) widened 16x, after `hetero trace` and `hetero calibrate` (its routing trace and
predictor beside it), decoding held-out prose (random-init routers would say nothing about how
often a cached expert is reused). For each, RAM budgets that put everything in RAM, about half on
disk, most on disk, and (MoE) experts split over RAM and disk; each budget is planned by the cost
planner and by the greedy fill-in-order planner, and both plans run in the same run, interleaved.
The MoE's predictions use what the runtime knows from the trace: expert frequencies, the expert
cache's policy replayed on the trace (experts/replay.hit_shares) and the predictor's held-out recall.

Regime: disk-tier reads come from the disk: the runtime reads them from the model's pack with
O_DIRECT (the prefetch pipeline's reader pool, lm_head slices on the compute thread), so the page
cache never serves them; the checkpoint's files are still dropped from the page cache before every
decoded token (outside the timed forward), as in the profile's cold reads.

Measured decode s/token: the median over the decoded tokens of one round, then the median over
--rounds interleaved rounds. Predicted: cost.predict (the executor's schedule replayed: reads ahead
of compute by the plan's depth, the next token's first reads during lm_head, expert caches) with the
profile measured (when the machine is quiet, --wait-quiet) at the start of the run. On a shared
machine the disk's speed drifts between that moment and each measurement (other work on the same
disk), so each round also re-measures the cold read rates of the model's own file just before its
tokens and predicts again with those disk tables and the decode matvec and per-layer overheads of
the model's dtype and family measured again ("err@now"): the profile's error minus the machine's
drift (on a shared host memory bandwidth moves by a third within minutes), i.e. the model's
structural error. --wait-quiet waits for other processes' CPU use and for
the disk's busy time (/proc/diskstats) to drop before the profile and before every measurement;
"others" reports the CPU share and "disk" the disk busy share other work had just before measuring.
Predicted and measured seconds the loop stalled on reads per token are printed side by side.
Prints a table and writes benchmarks/results/plan_accuracy.json.
"""

import argparse
import json
from dataclasses import replace
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
CACHE = Path(os.environ.get("HETERO_BENCH_CACHE") or Path.home() / ".cache" / "hetero-bench")
PROMPT_TOKENS, CONTEXT = 32, 512

GENERATED = {
    # 350M parameters, float32: 1.4 GB
    "dense": dict(model_type="llama", vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=10,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
}


def trained_moe() -> Path:
    """moe_offload.py's widened fixture with its routing trace and calibrated predictor (built once)."""
    import moe_offload

    model = CACHE / moe_offload.NAME
    moe_offload.make_model(model, moe_offload.fixture_dir())
    return moe_offload.calibrated_copy(model, CACHE)


def token_stream(name: str, path: Path, n: int) -> list[int]:
    """n token ids to run: held-out prose for the trained MoE (its routing follows the text), else fixed ids."""
    if name != "moe":
        return ((torch.arange(n) * 7 % 1000 + 5).tolist())[:PROMPT_TOKENS] + [11 + i for i in range(n - PROMPT_TOKENS)]
    import corpus
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(corpus.eval_text(20_000)).ids
    return ids[:n]


def generated(name: str) -> Path:
    """A random-weight checkpoint written once by transformers (save_pretrained layout)."""
    out = CACHE / name
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(GENERATED[name])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    print(f"generating {name} into {out} ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def compute_now(profile, desc) -> dict:
    """The profile's cpu figures with this moment's decode matvec and its fixed cost per call (the model's dtype) and its family's
    overheads measured again (quick probes): the machine's memory bandwidth drifts on a shared host."""
    from hetero.placement import overheads, probes

    cpu = dict(profile.compute["cpu"])
    name = str(desc.dtype).removeprefix("torch.")
    table = probes.matvec("cpu", desc.dtype, quick=True)
    cpu["matvec"] = {**cpu["matvec"], name: table}
    cpu["matvec_call_s"] = {**cpu.get("matvec_call_s", {}), name: probes.matvec_call("cpu", desc.dtype, True)}
    mt = desc.args.model_type
    cpu["overheads"] = {**cpu["overheads"], **overheads.measure("cpu", True, [mt])}
    return {**profile.compute, "cpu": cpu}


def routing_workload(base, path: Path):
    """The Workload as the runtime knows it for this model: for an MoE with a trace and predictor beside
    it, what load_offloaded passes the cost model (its expert_freq places the experts)."""
    from hetero import api
    from hetero.checkpoint.catalogue import Catalogue
    from hetero.config import ModelArgs
    from hetero.models import family_for

    args = ModelArgs.from_dir(path)
    model = family_for(args).build(args)
    if not model.moe_blocks():
        return base
    cat = Catalogue(path)
    try:
        facts = api._routing_facts(path, cat, model, True, "score", [])
    finally:
        cat.close()
    return replace(base, **facts)


def others_busy(window: float = 0.5) -> float:
    """Share of the machine's CPU time used by other processes over `window` seconds (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        t = os.times()
        return sum(v), v[3] + v[4], (t.user + t.system) * os.sysconf("SC_CLK_TCK")
    a = snap()
    time.sleep(window)
    b = snap()
    total = max(1, b[0] - a[0])
    return max(0.0, (total - (b[1] - a[1]) - (b[2] - a[2])) / total)


def _disk_ticks() -> int | None:
    """Milliseconds the disk holding the bench cache has spent doing I/O (/proc/diskstats io_ticks)."""
    try:
        st = os.stat(CACHE if CACHE.exists() else Path.home())
        want = (os.major(st.st_dev), os.minor(st.st_dev))
        with open("/proc/diskstats") as f:
            for line in f:
                v = line.split()
                if (int(v[0]), int(v[1])) == want:
                    return int(v[12])
    except (OSError, ValueError, IndexError):
        pass
    return None


def quiet_sample(window: float = 0.5) -> tuple[float, float]:
    """(share of the CPU used by other processes, share of time the disk was busy) over `window` seconds.

    We do no I/O while sampling, so the disk's busy time is other work's."""
    d0 = _disk_ticks()
    cpu = others_busy(window)
    d1 = _disk_ticks()
    disk = (d1 - d0) / (1e3 * window) if d0 is not None and d1 is not None else 0.0
    return cpu, min(1.0, max(0.0, disk))


def wait_quiet(limit_s: float, threshold: float = 0.25, disk_threshold: float = 0.1) -> tuple[float, float]:
    """Wait (at most limit_s) until other processes use less than `threshold` of the CPU and keep the disk
    busy less than `disk_threshold` of the time; returns (cpu share, disk share) at the end."""
    end = time.time() + limit_s
    busy = quiet_sample()
    while (busy[0] > threshold or busy[1] > disk_threshold) and time.time() < end:
        busy = quiet_sample()
    return busy


def drop_page_cache(path: Path):
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def budgets_for(name: str, size: int) -> dict:
    """RAM budgets (bytes) by scenario, as shares of the model's size."""
    out = {"all in RAM": 2 * size, "half on disk": int(0.55 * size), "mostly on disk": int(0.2 * size)}
    if name == "moe":
        out["experts split"] = int(0.45 * size)
    return out


def decode_times(m, path: Path, stream: list[int], tokens: int) -> tuple[list[float], float]:
    """(seconds of each decoded token, the page cache dropped before each; seconds stalled on reads per token)."""
    ex = m.executor
    cache = ex.new_cache()
    try:
        ids = torch.tensor([stream[:PROMPT_TOKENS]])
        drop_page_cache(path)
        ex.forward(ids, cache, last_only=True)
        stall0 = ex.timing.get("decode_io_stall_s", 0.0)
        times = []
        for i in range(tokens):
            drop_page_cache(path)
            t0 = time.perf_counter()
            ex.forward(torch.tensor([[stream[PROMPT_TOKENS + i]]]), cache, last_only=True)
            times.append(time.perf_counter() - t0)
        return times, (ex.timing.get("decode_io_stall_s", 0.0) - stall0) / max(1, tokens)
    finally:
        cache.free()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="smollm2,dense,moe")
    ap.add_argument("--no-refresh", action="store_true", help="use the cached profile instead of measuring now")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="before each measurement, wait up to this many seconds for other processes to go quiet")
    args = ap.parse_args()

    import hetero
    from hetero import store
    from hetero.placement import hardware, probes
    from hetero.placement.cost import predict
    from hetero.placement.cost import Workload
    from hetero.placement.describe import describe_dir
    from hetero.placement.summary import make_plan

    if not args.no_refresh:
        wait_quiet(args.wait_quiet)
    profile = hardware.get_profile(refresh=not args.no_refresh, log=lambda m: print(m, file=sys.stderr))
    paths = {n: {"smollm2": lambda: store.resolve("smollm2"), "moe": trained_moe}.get(n, lambda: generated(n))()
             for n in args.models.split(",")}
    descs = {n: describe_dir(p) for n, p in paths.items()}
    streams = {n: token_stream(n, p, PROMPT_TOKENS + args.tokens) for n, p in paths.items()}
    base = Workload(prompt_tokens=PROMPT_TOKENS, new_tokens=args.tokens)
    runs = []  # one per (model, scenario, planner)
    for name, path in paths.items():
        desc = descs[name]
        workload = routing_workload(base, path)
        for scenario, ram in budgets_for(name, desc.total_bytes).items():
            for planner in ("cost", "greedy"):
                plan, pred = make_plan(desc, {"cpu": ram}, "cpu", CONTEXT, True, profile, workload, planner,
                                       expert_freq=workload.expert_freq)
                same = next((r for r in runs if r["model"] == name and r["scenario"] == scenario
                             and r["plan"].tiers == plan.tiers), None)
                resident = {t: sum(g.nbytes for g in desc.groups if plan.tiers[g.name] == t) for t in ("cpu", "disk")}
                runs.append({"model": name, "scenario": scenario, "planner": planner, "ram": ram, "plan": plan,
                             "same_as": same["planner"] if same else None, "resident": resident,
                             "predicted": pred.decode_s_per_token, "bottleneck": pred.bottleneck,
                             "predicted_stall": pred.stall_s, "rounds": []})
    for rnd in range(args.rounds):  # interleaved: every plan once per round
        for r in runs:
            if r["same_as"]:
                continue
            m = hetero.load_offloaded(paths[r["model"]], plan=r["plan"], log_fn=lambda *_: None)
            biggest = max(paths[r["model"]].glob("*.safetensors"), key=lambda f: f.stat().st_size)
            wait_quiet(args.wait_quiet)
            desc = descs[r["model"]]
            disk = probes.disk_read(str(biggest), quick=True)  # this moment's cold reads, of this model's file
            now_profile = replace(profile, disk_read=disk, compute=compute_now(profile, desc))
            now = predict(desc, r["plan"], now_profile, routing_workload(base, paths[r["model"]])).decode_s_per_token
            cpu, io = wait_quiet(args.wait_quiet)
            r.setdefault("busy", []).append(cpu)
            r.setdefault("disk_busy", []).append(io)
            times, stall = decode_times(m, paths[r["model"]], streams[r["model"]], args.tokens)
            r["rounds"].append(statistics.median(times))
            r.setdefault("stalls", []).append(stall)
            r.setdefault("now", []).append(now / r["rounds"][-1] - 1)
            del m
            print(f"round {rnd + 1}: {r['model']} {r['scenario']} {r['planner']}: {1e3 * r['rounds'][-1]:.1f} ms/token",
                  file=sys.stderr)
    for r in runs:
        src = r if not r["same_as"] else next(x for x in runs if x["model"] == r["model"] and
                                              x["scenario"] == r["scenario"] and x["planner"] == r["same_as"])
        r["measured"] = statistics.median(src["rounds"])
        r["spread"] = (max(src["rounds"]) - min(src["rounds"])) / r["measured"]
        r["error_now"] = statistics.median(src["now"])
        r["others_busy"] = statistics.median(src["busy"])
        r["others_disk"] = statistics.median(src["disk_busy"])
        r["stall"] = statistics.median(src["stalls"])
        r["error"] = r["predicted"] / r["measured"] - 1
    report(runs, profile, args)


def report(runs, profile, args):
    from hetero.sizes import format_size

    print(f"decode s/token, predicted vs measured; {args.tokens} tokens after a {PROMPT_TOKENS}-token prompt, "
          f"median of {args.rounds} rounds; page cache dropped before each token; torch threads "
          f"{torch.get_num_threads()}; profile measured in {profile.measured_s:.0f} s")
    head = (f"{'model':<9}{'scenario':<16}{'planner':<8}{'RAM budget':>11}{'cpu / disk':>22}{'pred ms':>9}{'meas ms':>9}"
            f"{'spread':>8}{'error':>8}{'err@now':>8}{'stall p/m ms':>14}{'others':>8}{'disk':>6}  bottleneck")
    print(head)
    print("(spread: (slowest - fastest round) / median; err@now: predicted with the disk, matvec and overheads re-measured just before "
          "each round; stall: seconds per token the loop waited for reads, predicted / measured; others, disk: "
          "CPU share other processes used and disk busy share just before measuring)")
    cost = [r for r in runs if r["planner"] == "cost"]
    for r in runs:
        res = f"{format_size(r['resident']['cpu'])} / {format_size(r['resident']['disk'])}"
        same = f"  (= {r['same_as']} plan)" if r["same_as"] else ""
        print(f"{r['model']:<9}{r['scenario']:<16}{r['planner']:<8}{format_size(r['ram']):>11}{res:>22}"
              f"{1e3 * r['predicted']:>9.1f}{1e3 * r['measured']:>9.1f}{100 * r['spread']:>7.0f}%{100 * r['error']:>7.1f}%"
              f"{100 * r['error_now']:>7.1f}%{1e3 * r['predicted_stall']:>7.0f} /{1e3 * r['stall']:>5.0f}"
              f"{100 * r['others_busy']:>7.0f}%{100 * r['others_disk']:>5.0f}%  {r['bottleneck']}{same}")
    distinct = [r for r in runs if not r["same_as"]]
    errs = [abs(r["error"]) for r in distinct]
    now = [abs(r["error_now"]) for r in distinct]
    ram = [abs(r["error"]) for r in distinct if r["resident"]["disk"] == 0]
    print(f"|error| over {len(errs)} distinct plans: median {100 * statistics.median(errs):.1f}%, worst {100 * max(errs):.1f}%; "
          f"with the machine re-measured at each round: median {100 * statistics.median(now):.1f}%, worst {100 * max(now):.1f}%; "
          f"plans all in RAM: worst {100 * max(ram):.1f}%")
    print("planner vs greedy, measured at the same budgets:")
    for r in cost:
        g = next(x for x in runs if x["model"] == r["model"] and x["scenario"] == r["scenario"] and x["planner"] == "greedy")
        verdict = "same plan" if g["same_as"] else f"{g['measured'] / r['measured']:.2f}x the greedy plan's speed"
        print(f"  {r['model']:<9}{r['scenario']:<16} cost {1e3 * r['measured']:.1f} ms, greedy {1e3 * g['measured']:.1f} ms: {verdict}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "plan_accuracy.json").write_text(json.dumps({
        "tokens": args.tokens, "rounds": args.rounds, "prompt_tokens": PROMPT_TOKENS, "context": CONTEXT,
        "threads": torch.get_num_threads(), "median_abs_error": statistics.median(errs), "worst_abs_error": max(errs),
        "median_abs_error_disk_now": statistics.median(now), "worst_abs_error_disk_now": max(now),
        "runs": [{k: v for k, v in r.items() if k != "plan"} | {"tiers": r["plan"].tiers} for r in runs],
    }, indent=1))


if __name__ == "__main__":
    main()
