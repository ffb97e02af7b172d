"""How long `np-jax run` keeps a person waiting: process start to the first generated token.

Run: `python -m benchmarks.bench_first_token [--runs 3] [--precision w8a8-pdd] [--json]`.

Runs the README's main job (`np-jax run`, SmolLM2-135M on the emulated 16-card appliance, one
user) as a person does, a new process each time, with `--new-tokens 2`, and reads its output as it
streams: the seconds from the process's start to each stage's line on stderr (loading, the
prepared model read from the cache, loaded, mapped, compiling) and to the first generated token on
stdout. The first run may prepare the model or compile programs that JAX's persistent cache then
keeps: it is reported apart ("cold"); the median of the other runs is the second run's figure, the
one a returning user sees. Goal: the first token within 5 s of a second run (issue "first contact
in three minutes"). Absolute seconds, unlike the other benchmarks' ratios: there is no plain-JAX
counterpart to a process start.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

GOAL_S = 5.0
PROMPT = "def fibonacci(n):"
STAGES = {"loading": "loading ", "cache read": "prepared model from the cache", "loaded": "model ",
          "mapped": "mapping: ", "compiling": "compiling ..."}


def one_run(argv: list[str]) -> dict:
    """Seconds from the process's start to each stage line and to the first generated token."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: dict[str, float] = {}

    def read_stderr():
        for raw in p.stderr:
            line = raw.decode(errors="replace")
            for stage, start in STAGES.items():
                if stage not in seen and line.startswith(start):
                    seen[stage] = time.perf_counter() - t0

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    n = 0
    echo = len(PROMPT.encode())  # the run echoes the prompt, then streams each token after it
    while True:
        c = p.stdout.read(1)
        if not c:
            break
        n += 1
        if n == echo + 1:
            seen["first token"] = time.perf_counter() - t0
    rc = p.wait()
    reader.join()
    seen["exit"] = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"{' '.join(argv)} exited with status {rc}")
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="processes started (the first is reported as cold)")
    ap.add_argument("--precision", default=None, help="run's --precision (default: run's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    exe = Path(sys.executable).with_name("np-jax")
    cmd = [str(exe) if exe.exists() else "np-jax", "run", "--new-tokens", "2", "--prompt", PROMPT]
    if args.precision:
        cmd += ["--precision", args.precision]
    runs = [one_run(cmd) for _ in range(max(2, args.runs))]
    warm = runs[1:]
    stages = list(STAGES) + ["first token", "exit"]
    median = {s: statistics.median(r[s] for r in warm if s in r) for s in stages if any(s in r for r in warm)}
    result = {"command": shlex.join(["np-jax"] + cmd[1:]), "cold": runs[0], "second_run_median": median,
              "goal_first_token_s": GOAL_S, "meets_goal": median.get("first token", 1e9) <= GOAL_S}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['command']}: seconds from the process's start")
        print(f"{'stage':<12} {'cold':>6} {'second run (median of ' + str(len(warm)) + ')':>28}")
        for s in stages:
            c = runs[0].get(s)
            print(f"{s:<12} {'-' if c is None else f'{c:6.2f}':>6} {median.get(s, float('nan')):28.2f}")
        print(f"goal: the first token within {GOAL_S:g} s of a second run: {'met' if result['meets_goal'] else 'NOT met'}")
    return 0 if result["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
