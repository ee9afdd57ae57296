"""How fast `hetero plan` answers on config-only directories of real models (target: under 2 s).

    python benchmarks/plan_speed.py [--ram 64GB] [--context 4096] [--repeats 3]

For Mixtral-8x7B, Qwen3-30B-A3B, Llama-3-70B and Qwen3-235B-A22B (their published config.json, no
weights), it times the command two ways: as a user runs it (a new process: interpreter and torch
start-up included) and in a warm process (the planning alone, as tests/test_plan_cli.py runs it).
Both use this machine's cached profile (`hetero profile`; a quick one is measured first if there is
none). Best of --repeats. Prints a table and writes benchmarks/results/plan_speed.json.
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from harness import print_table, write_json  # noqa: E402
from published_configs import CONFIGS  # noqa: E402

from hetero.cli import main as hetero_main  # noqa: E402

TARGET_S = 2.0


def best(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def in_process(argv: list):
    with redirect_stdout(io.StringIO()) as buf:
        try:
            hetero_main(argv)
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"hetero {' '.join(argv)} exited with {e.code}") from None
    return json.loads(buf.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default="64GB")
    ap.add_argument("--context", default="4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", dest="json_path", default=str(HERE / "results" / "plan_speed.json"))
    a = ap.parse_args()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (params, cfg) in CONFIGS.items():
            d = Path(tmp) / name
            d.mkdir()
            (d / "config.json").write_text(json.dumps(cfg))
            argv = ["plan", str(d), "--ram", a.ram, "--context", a.context, "--json"]
            r = in_process(argv)  # also measures the machine's profile once, if it has none yet
            warm = best(lambda: in_process(argv), a.repeats)
            cold = best(lambda: subprocess.run([sys.executable, "-m", "hetero", *argv], check=True,
                                               capture_output=True), a.repeats)
            results[name] = {"parameters": params,
                             "warm_s": warm, "new_process_s": cold,
                             "decode_tokens_per_s": r["predicted"]["decode_tokens_per_s"]}
            rows.append([name, f"{params / 1e9:.1f}B", f"{warm:.2f}", f"{cold:.2f}",
                         "yes" if max(warm, cold) < TARGET_S else "NO"])
    print_table(["model (config only)", "params", "warm process s", "new process s", f"< {TARGET_S:.0f} s"], rows)
    write_json(a.json_path, {"ram": a.ram, "context": a.context, "results": results})


if __name__ == "__main__":
    main()
