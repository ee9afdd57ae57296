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


def _progress(quiet: bool):
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
    task = bar.add_task("importing tensors", total=None)

    def update(done, total):
        bar.update(task, completed=done, total=total)
    return bar, update


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
    m = load_offloaded(path, vram=vram, ram=ram, disk_dir=disk_dir, dtype=dtype, device=device, plan=plan_file,
                       context=context, log_fn=say)
    if not quiet:
        _print_plan(m)
    return m


def _print_plan(m):
    table = Table(title=f"placement ({m.plan.kv_tokens}-token KV cache on {m.plan.compute})", title_justify="left")
    for col in ("group", "tier", "size"):
        table.add_column(col)
    for row in m.plan_rows():
        table.add_row(*row)
    err.print(table)
    res = m.stats()["resident_bytes"]
    err.print("resident: " + ", ".join(f"{t} {format_size(n)}" for t, n in res.items()), markup=False)


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
        "decode_disk_read_bytes_per_token": s["decode_disk_read_bytes_per_token"],
        "decode_host_to_device_bytes_per_token": s["decode_host_to_device_bytes_per_token"],
        "resident_bytes": s["resident_bytes"],
        "peak_bytes": {t: v["peak_bytes"] for t, v in s["memory"].items()},
        "budget_bytes": {t: v["budget_bytes"] for t, v in s["memory"].items()},
        "kv_tokens": m.plan.kv_tokens, "device": s["device"], "notes": s["notes"],
    }


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
        err.print(format_stats(m.stats()), markup=False)


def _chat(m, params, system, stats):
    from .chat import ChatSession, format_stats, repl

    session = ChatSession(m, params, system)
    repl(session)
    if stats:
        err.print(format_stats(m.stats()), markup=False)


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
    for col in ("name", "size", "dtype", "source"):
        table.add_column(col)
    for m in models:
        table.add_row(m["name"], format_size(m["bytes"]), m["dtype"] or "-", m["source"] or "-")
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
