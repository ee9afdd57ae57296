"""The `hetero` command. Errors users can cause print one line and exit with code 2.

The answer goes to stdout; logs, the placement table and progress go to stderr, so
`hetero run ... --prompt ... > answer.txt` keeps only the answer.
"""

import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import HeteroError
from .sizes import format_size

err = Console(stderr=True, highlight=False)


def _progress(quiet: bool, what: str = "importing tensors"):
    """A (context manager, callback(done, total)) pair drawing a progress bar on stderr."""
    if quiet:
        class _Null:
            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False
        return _Null(), None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), console=err, transient=True)
    task = None

    def update(done, total):
        nonlocal task
        if task is None:  # drawn from the first update on: a load that packs nothing shows no bar
            task = bar.add_task(what, total=total)
        bar.update(task, completed=done, total=total)
    return bar, update


def _kv_option(ctx, param, value):
    # --attention / --kv-budget reach _load through the click context, so the commands' signatures stay as they are
    ctx.meta[f"hetero.{param.name}"] = value


def _expert_option(ctx, param, value):
    # reaches _load through the click context, so the commands' signatures stay as they are
    ctx.meta[f"hetero.{param.name}"] = value


def _expert_cache(value):
    """--expert-cache: a number of slots ("8") or a size ("2GB")."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def _planner_option(ctx, param, value):
    # reaches _load through the click context, so the commands' signatures stay as they are
    ctx.meta["hetero.planner"] = value


def load_options(f):
    """Options shared by every command that loads a model."""
    for opt in reversed([
        click.option("--vram", help="Accelerator memory budget, e.g. 8GB (unused without an accelerator)."),
        click.option("--ram", help="Host memory budget, e.g. 4GB or 512MiB (default: 80% of available RAM)."),
        click.option("--disk-dir", type=click.Path(), help="Directory holding disk-tier weights."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype (default: the checkpoint's)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "fake-gpu"]), help="Compute device (default: detected)."),
        click.option("--plan", "plan_file", type=click.Path(), help="Use this plan JSON instead of planning."),
        click.option("--context", type=int, help="Tokens of KV cache to reserve (default: up to 4096, shrunk to fit)."),
        # kept in the click context (not a parameter of every command): _load reads it
        click.option("--pack", expose_value=False, callback=lambda ctx, _p, v: ctx.meta.__setitem__("hetero.pack", v),
                     help="Read disk-tier weights from a pack of this dtype: bf16, bf16z (bf16 losslessly compressed), "
                          "fp16, float32, int8, int4 (int8-g32: group size 32), or a pack directory (default: lossless, "
                          "the compute dtype or bf16z, whichever the cost model predicts faster)."),
        click.option("--planner", type=click.Choice(["cost", "greedy"]), default="cost", show_default=True,
                     expose_value=False, callback=_planner_option,
                     help="cost: place by predicted time (hetero plan); greedy: fill gpu, then RAM, in order."),
        click.option("--attention", type=click.Choice(["exact", "retrieval"]), default="exact", show_default=True,
                     expose_value=False, callback=_kv_option,
                     help="retrieval: decode attends to the KV kept on the device and to the top-k keys of the rest."),
        click.option("--kv-budget", expose_value=False, callback=_kv_option,
                     help="KV bytes kept on the compute device, e.g. 64MB; the rest goes to RAM and disk."),
        # MoE models: the expert caches and prefetch (kept in the click context, read by _load)
        click.option("--expert-cache", expose_value=False, callback=_expert_option,
                     help="MoE: size of each expert cache, e.g. 2GB, or a number of slots (default: sized from the "
                          "budgets when experts do not fit; 0: none)."),
        click.option("--no-prefetch", is_flag=True, expose_value=False, callback=_expert_option,
                     help="MoE: load experts on demand only (no routing prediction); outputs are identical."),
        click.option("--expert-policy", type=click.Choice(["score", "lru"]), default="score", show_default=True,
                     expose_value=False, callback=_expert_option,
                     help="MoE: expert-cache replacement (score: decayed frequency x routing weight)."),
        click.option("--quiet", "-q", is_flag=True, help="No logs or placement table, only the answer."),
    ]):
        f = opt(f)
    return f


def sampling_options(f):
    for opt in reversed([
        click.option("--max-tokens", default=256, show_default=True, help="Most tokens to generate per answer."),
        click.option("--temperature", default=0.0, show_default=True, help="0 is greedy (deterministic) decoding."),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--top-k", default=0, show_default=True, help="0 keeps every token."),
        click.option("--repeat-penalty", default=1.0, show_default=True),
        click.option("--seed", type=int, help="Seed for sampling."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
        click.option("--system", help="System prompt."),
    ]):
        f = opt(f)
    return f


def _load(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet):
    from .api import load_offloaded
    from .sizes import parse_size

    vram, ram = parse_size(vram, "--vram"), parse_size(ram, "--ram")  # before any download
    say = (lambda *_: None) if quiet else (lambda m: err.print(m, markup=False))
    bar, update = _progress(quiet)
    with bar:
        from . import store

        path = store.resolve(model, log=say, progress=update)
    meta = click.get_current_context().meta
    bar, update = _progress(quiet, "packing (bytes)")  # shown only when a plan puts weights on disk the first time
    with bar:
        m = load_offloaded(path, vram=vram, ram=ram, disk_dir=disk_dir, dtype=dtype, device=device, plan=plan_file,
                           context=context, log_fn=say, pack=meta.get("hetero.pack"), progress=update,
                           planner=meta.get("hetero.planner", "cost"), attention=meta.get("hetero.attention", "exact"),
                           kv_budget=meta.get("hetero.kv_budget"),
                           expert_cache=_expert_cache(meta.get("hetero.expert_cache")),
                           prefetch=not meta.get("hetero.no_prefetch", False),
                           expert_policy=meta.get("hetero.expert_policy", "score"))
    if not quiet:
        _print_plan(m)
    return m


def _print_plan(m):
    kv = f"{m.plan.kv_tokens}-token KV cache on {m.plan.compute}"
    if m.context_tokens > m.plan.kv_tokens:
        kv += f", paged up to {m.context_tokens} tokens"
    table = Table(title=f"placement ({kv})", title_justify="left")
    for col in ("group", "tier", "size"):
        table.add_column(col)
    for row in m.plan_rows():
        table.add_row(*row)
    err.print(table)
    res = m.stats()["resident_bytes"]
    err.print("resident: " + ", ".join(f"{t} {format_size(n)}" for t, n in res.items()), markup=False)


def _predicted_line(m) -> str:
    p = m.stats().get("predicted_decode_s_per_token")
    return f"\npredicted decode: {1 / p:.2f} tokens/s ({1e3 * p:.1f} ms/token, cost model)" if p else ""


def _params(model, max_tokens, temperature, top_p, top_k, repeat_penalty, seed, stop):
    from .generate import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repeat_penalty, seed=seed, stop=tuple(stop),
                          eos_token_ids=frozenset(model.tokenizer.eos_token_ids) if model.tokenizer else frozenset())


def _stats_json(m, gen: dict) -> dict:
    s = m.stats()
    return {
        "prompt_tokens": gen.get("prompt_tokens"), "generated_tokens": gen.get("generated_tokens"),
        "prefill_tokens_per_s": s["prefill_tokens_per_s"], "decode_tokens_per_s": s["decode_tokens_per_s"],
        "decode_s_per_token": s["decode_s_per_token"],
        "predicted_decode_s_per_token": s.get("predicted_decode_s_per_token"),
        "decode_disk_read_bytes_per_token": s["decode_disk_read_bytes_per_token"],
        "decode_host_to_device_bytes_per_token": s["decode_host_to_device_bytes_per_token"],
        "resident_bytes": s["resident_bytes"],
        "peak_bytes": {t: v["peak_bytes"] for t, v in s["memory"].items()},
        "budget_bytes": {t: v["budget_bytes"] for t, v in s["memory"].items()},
        "kv_tokens": m.plan.kv_tokens, "context_tokens": m.context_tokens, "device": s["device"], "notes": s["notes"],
        "decode_disk_read_gbps": s["decode_disk_read_gbps"], "decode_io_stall_s_per_token": s["decode_io_stall_s_per_token"],
        "decode_io_hidden_fraction": s["decode_io_hidden_fraction"], "io": s["io"],
        "experts": s.get("experts"),
    }


def _io_line(s: dict) -> str:
    """The disk pipeline's figures for --stats."""
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    io = s["io"]
    return (f"disk reads (decode): {f(s['decode_disk_read_gbps'], '.2f')} GB/s while reading, "
            f"{f(s['decode_io_stall_s_per_token'], '.4f')} s/token stalled, "
            f"{f(s['decode_io_hidden_fraction'] and 100 * s['decode_io_hidden_fraction'], '.0f')}% of read time hidden; "
            f"prefetch depth {io['prefetch_depth']}, pack {io['pack_dtype'] or '-'}, reader {io['reader'] or '-'}"
            f"{' (direct I/O)' if io['direct_io'] else ''}") + _experts_line(s.get("experts"))


def _experts_line(e: dict | None) -> str:
    """The expert runtime's figures for --stats (MoE models)."""
    if not e:
        return ""
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"
    hits = ", ".join(f"{t} {pct(r)}" for t, r in e["hit_rate_by_bytes"].items()) or "-"
    moved = lambda k: format_size(int(e[k] or 0))  # noqa: E731
    return (f"\nexperts: hit rate by bytes {hits}; per token: disk {moved('disk_read_bytes_per_token')}, "
            f"host->gpu {moved('host_to_device_bytes_per_token')}, stalled "
            f"{'-' if e['stall_s_per_token'] is None else format(e['stall_s_per_token'], '.4f')} s; "
            f"prefetch {'on' if e['prefetch'] else 'off'} ({e['predictor'] or 'no predictor'}, lookahead "
            f"{e['lookahead']}, recall {pct(e['recall'])}); caches {e['cache_slots'] or 'none'}, policy {e['policy']}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hetero")
def cli():
    """Run LLMs bigger than your memory: weights placed across gpu, cpu and disk."""


@cli.command()
@click.argument("model")
@load_options
@sampling_options
@click.option("--prompt", "-p", help="Answer this one prompt and exit (otherwise: interactive chat).")
@click.option("--stats", is_flag=True, help="Print speed, bytes read per token and memory per tier.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the text and the stats.")
def run(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet, max_tokens, temperature, top_p, top_k,
        repeat_penalty, seed, stop, system, prompt, stats, as_json):
    """Chat with MODEL, or answer --prompt. MODEL: a directory, a .gguf file, or a name (e.g. smollm2)."""
    m = _load(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet or as_json)
    if prompt is None:
        if as_json:
            raise HeteroError("--json needs --prompt (the chat is interactive)")
        return _chat(m, _params(m, max_tokens, temperature, top_p, top_k, repeat_penalty, seed, stop), system, stats)
    from .chat import ChatSession, format_stats

    session = ChatSession(m, _params(m, max_tokens, temperature, top_p, top_k, repeat_penalty, seed, stop), system)
    pieces = []
    for piece in session.send(prompt):
        pieces.append(piece)
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if as_json:
        print(json.dumps({"model": str(model), "text": "".join(pieces), **_stats_json(m, session.last_stats)}))
        return
    sys.stdout.write("\n")
    if stats:
        err.print(format_stats(m.stats()) + _predicted_line(m) + "\n" + _io_line(m.stats()), markup=False)


def _chat(m, params, system, stats):
    from .chat import ChatSession, format_stats, repl

    session = ChatSession(m, params, system)
    repl(session)
    if stats:
        err.print(format_stats(m.stats()) + _predicted_line(m) + "\n" + _io_line(m.stats()), markup=False)


@cli.command()
@click.argument("model")
@load_options
@sampling_options
@click.option("--stats", is_flag=True, help="Print speed and memory figures when the chat ends.")
def chat(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet, max_tokens, temperature, top_p, top_k,
         repeat_penalty, seed, stop, system, stats):
    """Interactive chat with MODEL."""
    m = _load(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet)
    _chat(m, _params(m, max_tokens, temperature, top_p, top_k, repeat_penalty, seed, stop), system, stats)


@cli.command()
@click.argument("model")
@load_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback lets other machines use the model.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait while one is answered; more are refused with 429.")
def serve(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet, host, port, max_queue):
    """Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from .server import bind, serve as serve_forever

    sock = bind(host, port)  # before loading: a busy port fails at once, not after the load
    m = _load(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet)
    serve_forever(m, m.path.name, sock, max_queue=max_queue, quiet=quiet,
                  log_fn=lambda s: err.print(s, markup=False, soft_wrap=True))


@cli.command()
@click.argument("name")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def pull(name, dtype, quiet):
    """Download a catalogue model (e.g. smollm2) into the model store."""
    from . import store

    bar, update = _progress(quiet)
    with bar:
        path = store.pull(name, dtype=dtype, progress=update, log=(lambda *_: None) if quiet else err.print)
    click.echo(f"{name}: {path}")


@cli.command()
@click.argument("model")
@click.option("--dtype", type=click.Choice(["bf16", "bf16z", "fp16", "float32", "int8", "int4"]),
              help="What to store: default the checkpoint's own dtype (lossless); bf16z: bf16 in 12 bits a weight, "
                   "lossless; int8/int4 quantize weights.")
@click.option("--group-size", type=int, default=64, show_default=True, help="int8/int4: input columns per scale.")
@click.option("--disk-dir", type=click.Path(), help="Write the pack here (default: inside the model's directory).")
@click.option("--quiet", "-q", is_flag=True)
def pack(model, dtype, group_size, disk_dir, quiet):
    """Write MODEL's weights as a pack for fast disk reads (done automatically on first need)."""
    from .api import pack_model

    say = (lambda *_: None) if quiet else (lambda m: err.print(m, markup=False))
    bar, update = _progress(quiet, "packing (bytes)")
    with bar:
        path = pack_model(model, dtype=dtype, group_size=group_size, disk_dir=disk_dir, log_fn=say, progress=update)
    click.echo(f"{model}: {path}")


@cli.command(name="import")
@click.argument("file", type=click.Path())
@click.option("--name", help="Name in the store (default: the file name).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def import_(file, name, dtype, quiet):
    """Import a .gguf FILE into the model store as safetensors."""
    from . import store

    bar, update = _progress(quiet)
    with bar:
        path = store.import_gguf_file(file, name, dtype, progress=update)
    click.echo(f"{path.name}: {path}")


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json):
    """Models in the store, and the catalogue's names."""
    from . import store

    models = store.list_models()
    if as_json:
        click.echo(json.dumps({"models": models, "catalogue": sorted(store.CATALOGUE)}))
        return
    table = Table(title=f"model store: {store.home()}", title_justify="left")
    for col in ("name", "size", "dtype", "packs", "source"):
        table.add_column(col)
    for m in models:
        table.add_row(m["name"], format_size(m["bytes"]), m["dtype"] or "-", ", ".join(m["packs"]) or "not packed",
                      m["source"] or "-")
    Console(highlight=False).print(table)
    pulled = {m["name"] for m in models}
    rest = [n for n in sorted(store.CATALOGUE) if n not in pulled]
    if rest:
        click.echo("in the catalogue, not pulled yet: " + ", ".join(rest))


@cli.command(name="rm")
@click.argument("name")
def rm(name):
    """Remove a model from the store."""
    from . import store

    store.remove(name)
    click.echo(f"removed {name}")


@cli.command()
@click.option("--disk-dir", type=click.Path(), help="Measure the disk holding this directory (default: the model store).")
@click.option("--refresh", is_flag=True, help="Measure again even if a profile of this hardware is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile(disk_dir, refresh, as_json):
    """Measure this machine (capacities, disk, copies, compute) for the planner; cached until the hardware changes."""
    from .placement import hardware

    say = (lambda *_: None) if as_json else (lambda m: err.print(m, markup=False))
    p = hardware.get_profile(disk_dir, refresh=refresh, log=say)
    if as_json:
        click.echo(p.to_json())
        return
    table = Table(title=f"hardware profile ({hardware.cache_path()})", title_justify="left")
    table.add_column("what")
    table.add_column("measured")
    for row in hardware.profile_rows(p):
        table.add_row(*row)
    Console(highlight=False).print(table)


@cli.command(name="plan")
@click.argument("model")
@click.option("--vram", help="Accelerator memory budget, e.g. 24GB (default: the accelerator's memory).")
@click.option("--ram", help="Host memory budget, e.g. 64GB (default: 80% of available RAM).")
@click.option("--context", type=int, help="Tokens of KV cache to reserve (default: up to 4096, shrunk to fit).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype (default: the checkpoint's).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "fake-gpu"]), help="Compute device (default: the profiled one).")
@click.option("--planner", type=click.Choice(["cost", "greedy"]), default="cost", show_default=True)
@click.option("--prompt-tokens", default=128, show_default=True, help="Prompt length the prediction assumes.")
@click.option("--new-tokens", default=128, show_default=True, help="Answer length the prediction assumes.")
@click.option("--profile", "profile_file", type=click.Path(), help="A profile JSON (`hetero profile --json`) instead of this machine's.")
@click.option("--save", type=click.Path(), help="Write the plan JSON here, for `hetero run --plan`.")
@click.option("--trace", "trace_file", type=click.Path(),
              help="MoE: a routing trace of this model (`hetero trace`): place experts and predict caches by it "
                   "(default: the one next to the model, if any).")
@click.option("--pack", help="Plan for disk-tier weights read from a pack of this dtype, as `hetero run --pack`: bf16, "
                             "bf16z, fp16, float32, int8, int4 (int8-g32: group size 32); default as `hetero run`: "
                             "lossless, the compute dtype or bf16z, whichever is predicted faster.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_(model, vram, ram, context, dtype, device, planner, prompt_tokens, new_tokens, profile_file, save, trace_file,
          pack, as_json):
    """Plan MODEL's placement and predict its speed, from config.json and safetensors headers only (no weights read)."""
    from .placement.summary import plan_command

    say = (lambda *_: None) if as_json else (lambda m: err.print(m, markup=False))
    data, plan, rows = plan_command(model, vram, ram, context, dtype, device, planner, prompt_tokens, new_tokens,
                                    profile_file, log=say, trace_file=trace_file, pack=pack)
    if save:
        plan.save(save)
    if as_json:
        click.echo(json.dumps(data))
        return
    out = Console(highlight=False)
    table = Table(title=f"{planner} plan for {data['model']} ({data['parameters'] / 1e9:.2f}B parameters, {data['dtype']}, "
                        f"{'config.json only' if data['source'] == 'config' else 'headers'}; {data['kv_tokens']}-token KV "
                        f"on {data['compute']}; {data['pack']} pack)", title_justify="left")
    for col in ("layers", "placement", "size", "KV", "bottleneck", "ms/token"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for tier, u in data["tiers"].items():
        budget = "" if u["budget_bytes"] is None else f" of {format_size(u['budget_bytes'])}"
        cache = f", expert cache {format_size(u['expert_cache_bytes'])}" if u.get("expert_cache_bytes") else ""
        out.print(f"{tier}: {format_size(u['total_bytes'])}{budget} (weights {format_size(u['weights_bytes'])}, "
                  f"staging {format_size(u['staging_bytes'])}{cache}, KV {format_size(u['kv_bytes'])})", markup=False)
    if data["weights_bytes"]["disk"]:
        out.print(f"disk-tier weights read from a {data['pack']} pack of {format_size(data['pack_bytes'])} "
                  "(written by the first run that needs it; --pack picks its dtype)", markup=False)
    p = data["predicted"]
    out.print(f"predicted on {data['compute_device']}: prefill {p['prefill_tokens_per_s']:.1f} tokens/s "
              f"({p['prompt_tokens']}-token prompt), decode {p['decode_tokens_per_s']:.2f} tokens/s "
              f"({1e3 * p['decode_s_per_token']:.1f} ms/token); bottleneck: {p['bottleneck']}", markup=False)
    mn = data["minimum"]
    flags = [f"--ram {format_size(mn['cpu_bytes'])}"] + ([f"--vram {format_size(mn['gpu_bytes'])}"] if "gpu_bytes" in mn else [])
    out.print(f"runs at all with: {', '.join(flags)} (a {mn['context']}-token KV cache)", markup=False)
    for n in data["notes"]:
        out.print(n, markup=False)
    if save:
        out.print(f"plan written to {save}", markup=False)


# ---------------------------------------------------------------- routing traces (experts/recording.py, replay.py)

@cli.command(name="trace")
@click.argument("model")
@load_options
@click.option("--text", "text_file", type=click.Path(), required=True, help="Text file to route through the model.")
@click.option("--out", type=click.Path(), help="Trace file to write (default: routing-trace.safetensors next to the model).")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Route at most this many tokens of the text.")
@click.option("--keep-x", is_flag=True, help="Also keep every MoE input (float16), for calibrating a predictor.")
def trace_(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet, text_file, out, max_tokens, keep_x):
    """Record which experts every token of a text picks in every MoE layer (a routing trace)."""
    from pathlib import Path

    from .experts.recording import TRACE_FILE, frequency_rows, read_text, record

    text = read_text(text_file)
    m = _load(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet)
    bar, update = _progress(quiet, "routing (tokens)")
    with bar:
        tr = record(m, text, max_tokens, keep_x=keep_x, progress=update)
    path = tr.save(Path(out) if out else Path(m.path) / TRACE_FILE)
    table = Table(title=f"expert use over {tr.num_tokens} tokens (top-{tr.top_k} of {tr.num_experts})",
                  title_justify="left")
    for col in ("layer", "most used (expert: share of tokens)", "least used", "busiest / even"):
        table.add_column(col)
    for layer, top, low, skew in frequency_rows(tr):
        table.add_row(str(layer), "  ".join(f"{e}: {s:.0%}" for e, s in top), f"{low:.1%}", f"{skew:.2f}x")
    Console(highlight=False).print(table)
    click.echo(f"trace written to {path}")


@cli.command(name="calibrate")
@click.argument("model")
@load_options
@click.option("--text", "text_file", type=click.Path(), help="Calibration text (default: the system's licence texts).")
@click.option("--max-tokens", type=click.IntRange(min=128), default=8192, show_default=True,
              help="Tokens of the text to record.")
@click.option("--out", type=click.Path(), help="Predictor file (default: routing-predictor.safetensors next to the model).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def calibrate_(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet, text_file, max_tokens, out, as_json):
    """Fit MODEL's routing predictor on a text sample and save it next to the model."""
    from .experts.recording import calibrate_model, read_text, sample_text

    text = read_text(text_file) if text_file else sample_text()
    if not text.strip():
        raise HeteroError("no built-in calibration text on this system (/usr/share/common-licenses); pass --text FILE")
    m = _load(model, vram, ram, disk_dir, dtype, device, plan_file, context, quiet or as_json)
    bar, update = _progress(quiet or as_json, "routing (tokens)")
    with bar:
        res = calibrate_model(m, text, max_tokens, out, progress=update)
    if as_json:
        click.echo(json.dumps(res))
        return
    depths = sorted(res["recall"])
    table = Table(title=f"routing recall on {res['eval_tokens']} held-out tokens (calibrated / speculative gating)",
                  title_justify="left")
    table.add_column("layer")
    for d in depths:
        table.add_column(f"{d} ahead")
    for layer in sorted({l for d in depths for l in res["recall"][d]}):
        table.add_row(str(layer), *(f"{res['recall'][d][layer]:.1%} / {res['speculative'][d][layer]:.1%}"
                                    if layer in res["recall"][d] else "-" for d in depths))
    table.add_row("average", *(f"{res['average'][d]:.1%} / {res['speculative_average'][d]:.1%}"
                               if res["average"][d] is not None else "-" for d in depths))
    Console(highlight=False).print(table)
    click.echo(f"predictor written to {res['path']} ({res['tokens']} tokens; recorded in {res['record_s']:.1f} s, "
               f"fitted in {res['fit_s']:.1f} s)")


@cli.command(name="replay")
@click.argument("trace_file", metavar="TRACE")
@click.option("--resident", default="30%", show_default=True, help="Share of all experts the cache holds.")
@click.option("--policies", default="score,lru,static,belady", show_default=True, help="Comma-separated policies.")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="One cache over all layers, or one per MoE layer.")
@click.option("--frequencies", "freq_file", type=click.Path(),
              help="Trace whose expert frequencies the static policy keeps (default: the replayed trace's own).")
@click.option("--model", help="Also replay score and LRU as the runtime runs them: this model's routing predictor "
                                "(calibrated when `hetero calibrate` fitted one) protecting and prefetching the experts "
                                "it predicts. Needs a trace recorded with --keep-x.")
@click.option("--lookahead", type=click.IntRange(1, 8), default=1, show_default=True,
              help="With --model: MoE layers predicted ahead.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def replay_(trace_file, resident, policies, scope, freq_file, model, lookahead, as_json):
    """Replay a routing trace through simulated expert caches: hit rate by bytes per policy, Belady's optimum included."""
    from . import store
    from .experts.recording import replay_predictor
    from .experts.replay import POLICIES, compare, parse_share, replay
    from .experts.trace import RoutingTrace

    share = parse_share(resident)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names or any(p not in POLICIES for p in names):
        raise HeteroError(f"--policies {policies!r}: choose from {', '.join(POLICIES)}")
    tr = RoutingTrace.load(trace_file)
    freq = None
    if freq_file:
        ft = RoutingTrace.load(freq_file)
        if (ft.layers, ft.num_experts) != (tr.layers, tr.num_experts):
            raise HeteroError(f"--frequencies {freq_file}: recorded on another model (layers or expert count differ)")
        freq = ft.frequencies()
    notes, kind = [], None
    predictor = replay_predictor(store.resolve(model), tr, lookahead, notes) if model else None
    results = compare(tr, names, share, scope, freq)
    if predictor is not None:
        pred, span = predictor
        kind = pred.kind
        for p in (n for n in names if n != "belady"):
            r = replay(tr, p, share, scope, freq, predictor=pred, lookahead=span)
            r.policy = f"{p}+prefetch"
            results.append(r)
    if as_json:
        click.echo(json.dumps({"trace": str(trace_file), "resident": share, "scope": scope, "predictor": kind,
                               "lookahead": lookahead if kind else None, "notes": notes,
                               "results": [r.as_dict() for r in results]}))
        return
    for n in notes:
        err.print(f"note: {n}", markup=False, soft_wrap=True)
    table = Table(title=f"{trace_file}: {tr.num_tokens} tokens, {share:.0%} of experts resident ({scope} cache, "
                        f"{results[0].slots} slots)", title_justify="left")
    for col in ("policy", "hit rate (bytes)", "misses / token", "miss bytes / token", "moved bytes / token"):
        table.add_column(col)
    for r in results:
        table.add_row(r.policy, f"{r.hit_rate_bytes:.1%}", f"{(r.accesses - r.hits) / max(r.tokens, 1):.2f}",
                      format_size(int(r.miss_bytes_per_token)), format_size(int(r.moved_bytes_per_token)))
    Console(highlight=False).print(table)
    if kind:
        click.echo(f"+prefetch: {kind} routing predictor, {lookahead} MoE layer(s) ahead; a prefetched expert "
                   "used later is a hit, and every prefetch, used or not, is in the moved bytes")


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="hetero", standalone_mode=False)
    except HeteroError as e:
        err.print(f"error: {e}", markup=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err.print("aborted", markup=False)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
