"""``python -m stress`` (``make stress``): the long runs behind docs/reliability.md.

Runs the issue-7 test modules with BPFCG_STRESS=1 — the same tests CI runs shortened —
in two pytest processes side by side (the kernel scenarios, and the fuzzers, which need
no kernel and would otherwise leave one core idle), then prints the results table:
one line per scenario with its runs, what held and its duration.

    python -m stress [--seed N] [--results FILE] [-- extra pytest arguments]

Exit status: 0 when every scenario held, 1 otherwise. Needs root (scratch cgroups, BPF).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = {
    "kernel": ["tests/test_crash_kernel.py", "tests/test_concurrency_kernel.py",
               "tests/test_limits_kernel.py"],
    "fuzz": ["tests/test_fuzz_plan.py", "tests/test_fuzz_hook.py"],
}


def run_groups(results: str, seed: str | None, extra: List[str]) -> Dict[str, Dict]:
    env = dict(os.environ, BPFCG_STRESS="1", BPFCG_STRESS_RESULTS=results)
    if seed is not None:
        env["BPFCG_STRESS_SEED"] = seed
    procs = {}
    started = time.monotonic()
    for name, files in GROUPS.items():
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   *files, *extra]
        print(f"stress: starting {name}: {' '.join(command[1:])}", flush=True)
        procs[name] = (subprocess.Popen(command, cwd=ROOT, env=env), time.monotonic())
    outcome = {}
    for name, (proc, start) in procs.items():
        code = proc.wait()
        outcome[name] = {"exit": code, "seconds": time.monotonic() - start}
    outcome["total"] = {"exit": max(o["exit"] for o in outcome.values()),
                        "seconds": time.monotonic() - started}
    return outcome


def table(results: str) -> str:
    rows = ["| scenario | runs | what held | seconds | details |", "|---|---:|---|---:|---|"]
    with open(results, encoding="utf-8") as handle:
        for line in handle:
            item = json.loads(line)
            details = ", ".join(f"{k} {v}" for k, v in item.items()
                                if k not in ("scenario", "runs", "held", "seconds"))
            rows.append(f"| {item['scenario']} | {item['runs']:,} | {item['held']} | "
                        f"{item['seconds']:,.1f} | {details} |")
    return "\n".join(rows)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", help="seed for the random-kill and concurrency runs")
    parser.add_argument("--results", help="where to keep the JSON lines (default: a temp file)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    results = args.results or tempfile.mkstemp(prefix="bpfcg-stress-", suffix=".jsonl")[1]
    open(results, "w").close()
    outcome = run_groups(results, args.seed, args.pytest_args)
    print()
    print(table(results))
    print()
    for name, item in outcome.items():
        verdict = "held" if item["exit"] == 0 else f"FAILED (exit {item['exit']})"
        print(f"stress: {name}: {verdict} in {item['seconds'] / 60:.1f} min")
    print(f"stress: results in {results}")
    return 0 if outcome["total"]["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
