"""One command for a host whose JAX sees an accelerator: which exact integer dot forms its backend
runs, the bit-exactness tests that matter there, and the benchmarks on random weights; one JSON.

Run: `python -m benchmarks.device_check [--platform gpu|cpu] [--out device_check.json] [--budget-s 480]
[--benchmarks core_array appliance train_step forward] [--appliance-cases smollm2:1:512 granite3b:28:128]
[--rounds 2]` (`make device-check`).

Each step runs in a child process on the chosen backend, one at a time, so that each has the
device's memory to itself and one that fails or outlasts the budget is stopped and recorded:

1. backend: platform, device kind and count, jax/jaxlib versions.
2. dot forms: each form the emulator multiplies integer codes in (int8-held codes with an int32
   accumulator; float32-held codes in a float32 dot at HIGHEST precision, exact below 2^24), at
   the bounds that allow them, on extreme and random codes, against a numpy int64 oracle; the
   cores-and-network path; and the form the emulator's default path picks (`array.dot_form`) on
   SmolLM2's shapes. Each case records the dots its program holds (from its jaxpr) and whether
   it compiled, ran and was exact.
3. tests: the bit-exactness tests that need one device, through pytest on the backend
   (NP_JAX_TEST_PLATFORM, tests/conftest.py): core array vs int64, pipeline == sequential and
   appliance == single device, train forward == serve forward and prefill + decode == forward.
4. benchmarks, in the budget left: core array (a subset, and the dot forms' speeds), appliance
   decode (`--weights random`; SmolLM2 in both layer forms, larger shapes scanned), the QAT step
   and the integer forward (`--weights random`). One that fails, misses its goal or does not fit
   the budget is recorded as such.

Exit status: 0 when every exactness check passed (steps 2 and 3), 1 otherwise, 2 for bad input
or a backend JAX cannot start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROG = "benchmarks.device_check"
# JAX_PLATFORMS per --platform: "gpu" would expand to cuda, rocm and oneapi, and JAX fails on
# each one that is absent, so the NVIDIA platform is named.
JAX_PLATFORM = {"gpu": "cuda", "cpu": "cpu"}
MIN_STEP_S = 20  # a step is not started with less budget left than this

TEST_GROUPS = {  # the tests that need one device (the 16-device cases cannot run on one accelerator)
    "core_array_vs_int64": [
        "tests/test_core.py::test_core_vmm_matches_int64_oracle",
        "tests/test_core.py::test_core_vmm_exact_beyond_float32_integer_range",
        "tests/test_core.py::test_accumulator_bound_edges",
        "tests/test_core.py::test_saturating_sum_matches_clipped_int64",
        "tests/test_core.py::test_saturating_add_edges",
        "tests/test_array.py::test_array_vmm_matches_oracle_and_single_core",
        "tests/test_array.py::test_whole_k_float32_dot_only_below_its_exact_bound",
        "tests/test_array.py::test_whole_k_int8_dot_only_while_no_int32_sum_can_overflow",
        "tests/test_array.py::test_dot_form_and_with_form",
        "tests/test_array.py::test_partial_sum_network_saturates_in_row_order",
    ],
    "pipeline_vs_sequential": [
        "tests/test_appliance.py::test_pipelined_prefill_and_decode_equal_sequential_bits[1]",
        "tests/test_appliance.py::test_pipelined_prefill_and_decode_equal_sequential_bits[resident]",
        "tests/test_appliance.py::test_pipelined_prefill_and_decode_equal_sequential_bits[unrolled]",
        "tests/test_appliance.py::test_pipelined_prefill_and_decode_equal_sequential_bits[one micro-batch]",
        "tests/test_appliance.py::test_appliance_generation_equals_single_device_generation[16-2-1]",
    ],
    "train_vs_serve": [
        "tests/test_model.py::test_training_forward_equals_serving_forward",
        "tests/test_model.py::test_prefill_then_decode_equals_full_forward_bit_exact",
        "tests/test_model.py::test_prefill_split_point_does_not_change_bits",
        "tests/test_model.py::test_users_are_independent_and_prompt_length_buckets",
    ],
}
BENCHMARKS = ("core_array", "appliance", "train_step", "forward")
APPLIANCE_MODELS = ("smollm2", "granite3b", "smollm2-135m", "granite-3b-northpole")
CORE_ARRAY_CASES = [(2, 4096, 4096, 4), (28, 4096, 14336, 8)]  # of bench_core_array.CASES: both widths and batches


# --- the steps run in child processes -----------------------------------------------------------

def backend_info() -> dict:
    import jax
    import jaxlib

    devs = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devs[0].device_kind, "device_count": len(devs),
            "platform_version": devs[0].client.platform_version, "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def _dots(fn, *args) -> list[str]:
    """The dot_generals in `fn`'s jaxpr: operand dtypes -> result dtype (and precision when set)."""
    import jax

    out = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                p = e.params.get("precision")
                out.append(" x ".join(str(v.aval.dtype) for v in e.invars) + f" -> {e.outvars[0].aval.dtype}"
                           + (f" {p[0]}" if p and p[0] is not None else ""))
            for v in e.params.values():
                if hasattr(v, "eqns") or hasattr(v, "jaxpr"):
                    walk(v.jaxpr if hasattr(v, "jaxpr") else v)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def _operands(rng, rows, k, n, x_bits, w_bits, kind):
    """Integer codes x [rows, k] and w [k, n] (int64): uniform ("random"), or only the extremes of
    each width ("extreme"), with x's first row and w's first column the most negative code (their
    product reaches the worst case of the bound) and w's second column the most positive."""
    from np_jax.chip import core

    (xlo, xhi), (wlo, whi) = core.int_range(x_bits), core.int_range(w_bits)
    if kind == "random":
        return rng.integers(xlo, xhi + 1, (rows, k)), rng.integers(wlo, whi + 1, (k, n))
    x, w = rng.choice([xlo, xhi], (rows, k)), rng.choice([wlo, whi], (k, n))
    x[0], w[:, 0], w[:, 1] = xlo, wlo, whi
    return x, w


def _case(record: dict, run) -> dict:
    """`record` with `run()`'s fields, or with the error that stopped it (compile or run)."""
    try:
        return record | run()
    except Exception as e:  # noqa: BLE001 -- a form the backend cannot compile or run is a result
        return record | {"ok": False, "exact": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def probe() -> dict:
    """The exact integer dot forms on this backend, against a numpy int64 oracle (see the module doc)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from np_jax.chip import array as na
    from np_jax.chip import core

    rng = np.random.default_rng(0)
    dims = (((1,), (0,)), ((), ()))
    forms = []
    # int_dot in each form, at the largest K its form allows: int8 x int8 -> int32 while one
    # dot of the whole K cannot overflow int32 (the whole-K bound of network_never_saturates),
    # float32 while every partial sum stays below 2^24 (core.exact_in_float32)
    for form, dtype, bits, k in (("int8", jnp.int8, 8, 2**17 - 1), ("float32", jnp.float32, 8, 1023),
                                 ("float32", jnp.float32, 4, 2**18 - 1)):
        for rows in (1, 28):
            for kind in ("extreme", "random"):
                x, w = _operands(rng, rows, k, 8, bits, bits, kind)

                def run(x=x, w=w, bits=bits, k=k, dtype=dtype):
                    f = jax.jit(lambda a, b: core.int_dot(a, b, dims, k=k, x_bits=bits, w_bits=bits))
                    args = (jnp.asarray(x, dtype), jnp.asarray(w, dtype))
                    got = np.asarray(f(*args), np.int64)
                    return {"ok": True, "dots": _dots(f, *args), "exact": bool(np.array_equal(got, x @ w)),
                            "max_abs_sum": int(np.abs(x @ w).max())}

                forms.append(_case({"check": "int_dot", "form": form, "x_bits": bits, "w_bits": bits, "k": k,
                                    "rows": rows, "codes": kind, "bound": core.accumulator_bound(k, bits, bits)}, run))
    # float32-held codes past their bound: int_dot takes the int8 dot instead (checked), where a
    # float32 dot rounds (recorded as the control that the oracle tells the two apart)
    k = 16 * 1023
    x, w = rng.integers(100, 128, (1, k)), rng.integers(100, 128, (k, 8))
    xf, wf = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)

    def past_bound():
        f = jax.jit(lambda a, b: core.int_dot(a, b, dims, k=k, x_bits=8, w_bits=8))
        return {"ok": True, "dots": _dots(f, xf, wf), "exact": bool(np.array_equal(np.asarray(f(xf, wf)), x @ w))}

    def plain_float32():
        f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST))
        got = np.asarray(f(xf, wf)).astype(np.int64)
        return {"ok": True, "dots": _dots(f, xf, wf), "exact": bool(np.array_equal(got, x @ w)),
                "max_abs_error": int(np.abs(got - x @ w).max())}

    forms.append(_case({"check": "int_dot", "form": "float32-held past 2^24", "x_bits": 8, "w_bits": 8, "k": k,
                        "rows": 1, "codes": "random in [100, 127]"}, past_bound))
    control = _case({"check": "control: a float32 dot past 2^24", "k": k, "rows": 1, "codes": "random in [100, 127]",
                     "expected": "inexact"}, plain_float32)

    # the cores and the saturating partial-sum network (array_vmm's path where one dot is not
    # exact): int8-held, 3 core rows of the widest K a core may reduce, extreme codes, so the
    # network saturates; float32-held, 16 core rows of K = 1023 (each core exact, the whole K not)
    def network(form, k_rows, rows, x_bits, w_bits):
        kb = k_rows // rows
        x, w = _operands(rng, 2, k_rows, 3, x_bits, w_bits, "extreme")
        partial = np.stack([x[:, r * kb:(r + 1) * kb] @ w[r * kb:(r + 1) * kb] for r in range(rows)])
        want = partial[0]
        for p in partial[1:]:  # the network adds in row order, clamping to int32
            want = np.clip(want + p, core.INT32_MIN, core.INT32_MAX)

        def run():
            tw = na.with_form(na.tile_weights(jnp.asarray(w, jnp.int8), bits=w_bits,
                                              tiling=na.Tiling(k_rows, 3, rows=rows, cols=1)), form)
            f = jax.jit(lambda a, t: na.array_vmm(a, t, x_bits=x_bits))
            xa = jnp.asarray(x, jnp.int8)
            got = np.asarray(f(xa, tw), np.int64)
            return {"ok": True, "whole_k_dot": na.network_never_saturates(tw, x_bits), "dots": _dots(f, xa, tw),
                    "exact": bool(np.array_equal(got, want)),
                    "saturated": bool(np.isin(want, [core.INT32_MIN, core.INT32_MAX]).any())}

        return _case({"check": "array_vmm cores + network", "form": form, "x_bits": x_bits, "w_bits": w_bits,
                      "k": k_rows, "core_rows": rows, "rows": 2, "codes": "extreme"}, run)

    forms.append(network("int8", 3 * (2**17 - 1), 3, 8, 8))
    forms.append(network("float32", 16 * 1023, 16, 8, 8))

    # the emulator's default path: the codes held in dot_form(rows) (as the appliance holds them
    # for its users), array_vmm with no options, on SmolLM2's shapes at INT8 x INT4
    default = []
    for rows, k, n in ((1, 576, 1536), (1, 1536, 576), (1, 576, 49152), (28, 576, 1536), (28, 1536, 576)):
        x, w = _operands(rng, rows, k, n, 8, 4, "random")

        def run(x=x, w=w, rows=rows):
            tw = na.with_form(na.tile_weights(jnp.asarray(w, jnp.int8), bits=4), na.dot_form(rows))
            f = jax.jit(lambda a, t: na.array_vmm(a, t, x_bits=8))
            xa = jnp.asarray(x, jnp.int8)
            got = np.asarray(f(xa, tw), np.int64)
            return {"ok": True, "whole_k_dot": na.network_never_saturates(tw, 8), "dots": _dots(f, xa, tw),
                    "exact": bool(np.array_equal(got, x @ w))}

        default.append(_case({"rows": rows, "k": k, "n": n, "x_bits": 8, "w_bits": 4, "form": na.dot_form(rows)},
                             run))
    return {"forms": forms, "control": control, "default_path": default,
            "exact": all(c["exact"] for c in forms + default)}


def core_array_benchmark(rounds: int, repeats: int) -> dict:
    """bench_core_array on a subset of its cases, and its dot forms on SmolLM2's decode shapes."""
    import jax

    from benchmarks import bench_core_array as b

    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cases": b.run(CORE_ARRAY_CASES, rounds=rounds, repeats=repeats),
            "dot_forms": b.dot_forms(rounds=rounds, repeats=repeats)}


# --- the parent: runs the steps, keeps the budget, writes the JSON ------------------------------

def _fail(msg: str):
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _last_json(text: str):
    """The JSON object a child printed last on stdout (benchmarks print one, possibly indented)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return None


class Runner:
    def __init__(self, jax_platform: str, budget_s: float):
        self.deadline = time.monotonic() + budget_s
        self.env = os.environ | {"JAX_PLATFORMS": jax_platform, "PYTHONUNBUFFERED": "1"}
        if jax_platform != "cpu":
            self.env["NP_JAX_TEST_PLATFORM"] = jax_platform
        else:
            self.env.pop("NP_JAX_TEST_PLATFORM", None)  # the suite's own set-up

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str]) -> dict:
        """Run `cmd` in the repository root with the budget left as its limit: rc, seconds, stdout,
        the end of stderr, and whether it was stopped at the limit."""
        left = self.left()
        if left < MIN_STEP_S:
            return {"status": "not run", "why": f"{max(left, 0):.0f} s of the budget left"}
        t0 = time.monotonic()
        # a session of its own, so that the whole process group can be stopped at the limit
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=left)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            timed_out = True
        return {"rc": p.returncode, "seconds": round(time.monotonic() - t0, 1), "timed_out": timed_out,
                "stdout": out, "stderr_tail": err[-1500:]}

    def child(self, call: str) -> dict:
        """A function of this module in a child process; its JSON under "result" (None if none)."""
        r = self.run([sys.executable, "-c", f"import json; from benchmarks import device_check as d; "
                                            f"print(json.dumps(d.{call}))"])
        if "stdout" in r:
            r["result"] = _last_json(r.pop("stdout"))
            r["status"] = "ok" if r["result"] is not None else ("timed out" if r["timed_out"] else "failed")
        return r


def run_tests(runner: Runner, node_ids: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        r = runner.run([sys.executable, "-m", "pytest", "-q", f"--junitxml={xml}", *node_ids])
        out = {"node_ids": node_ids} | {k: v for k, v in r.items() if k != "stdout"}
        if "rc" not in r:
            return out | {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "all_passed": False}
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failures = []
        cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else []
        for c in cases:
            kind = next((t for t in ("failure", "error", "skipped") if c.find(t) is not None), None)
            counts[{"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[kind]] += 1
            if kind in ("failure", "error"):
                # the module's name: junit's classname is its path from pytest's rootdir, which
                # depends on where the tests and the checkout lie
                failures.append(f"{(c.get('classname') or '').rsplit('.', 1)[-1]}::{c.get('name')}")
        out["stdout_tail"] = r["stdout"][-1500:]
        return out | counts | {"failures": failures, "status": "timed out" if r["timed_out"] else "ran",
                               "all_passed": r["rc"] == 0 and counts["passed"] >= len(node_ids)
                               and not (counts["failed"] or counts["errors"])}


def _appliance_cmd(case: str, rounds: int) -> list[str]:
    # SmolLM2 in both layer forms; larger shapes scanned, as docs/benchmarks.md runs the 3B shape
    # (its float32 model is 12 GB, and the unrolled form would hold a second copy)
    forms = [] if case.startswith("smollm2") else ["--layers", "scan", "--float-forms", "scan"]
    return [sys.executable, "-m", "benchmarks.bench_appliance", "--json", "--weights", "random", "--cases", case,
            *forms, "--rounds", str(rounds), "--repeats", "3"]


def run_benchmark(runner: Runner, cmd: list[str]) -> dict:
    r = runner.run(cmd)
    if "stdout" not in r:
        return r
    result = _last_json(r.pop("stdout"))
    # the benchmarks exit 1 when they miss a goal: their JSON says they ran
    status = "ok" if result is not None else ("timed out" if r["timed_out"] else "failed")
    return r | {"status": status, "goal_met": r["rc"] == 0, "result": result}


def _ratios(b: dict) -> str:
    res = b.get("result") or {}
    rows = res.get("cases") or res.get("rows") or ([res] if "ratio" in res else [])
    return ", ".join(f"{r['ratio']:.2f}" for r in rows if "ratio" in r)


def summary(report: dict) -> str:
    be = report["backend"]
    lines = [f"device check on {be['backend']} ({be['device_count']} x {be['device_kind']}; {be['platform_version']}; "
             f"jax {be['jax']}, jaxlib {be['jaxlib']}), {report['elapsed_s']:.0f} s of {report['budget_s']:.0f} s"]
    dots = report["dot_forms"]
    if dots.get("result"):
        res = dots["result"]
        for c in res["forms"]:
            lines.append(f"  {c['check']:<27} {c['form']:<23} K {c['k']:>6} x{c['rows']:>3} {c['codes']:<8} "
                         + ("exact" if c["exact"] else f"NOT EXACT {c.get('error', '')}") + f"  {c.get('dots', '')}")
        for c in res["default_path"]:
            lines.append(f"  default path, {c['rows']:>2} row(s) {c['k']} x {c['n']}: codes held as {c['form']}, "
                         f"whole-K dot {c.get('whole_k_dot')}: " + ("exact" if c["exact"] else "NOT EXACT")
                         + f"  {c.get('dots', '')}")
        ctl = res["control"]
        lines.append(f"  control, a float32 dot past 2^24: {'exact' if ctl['exact'] else 'inexact'} "
                     f"(the oracle tells the forms apart where it is inexact)")
    else:
        lines.append(f"  dot forms: {dots['status']}: {dots.get('why') or dots.get('stderr_tail', '')[-300:]}")
    for g, t in report["tests"].items():
        lines.append(f"  tests {g}: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                     f"{t.get('errors', 0)} errors ({t.get('status')}{', ' + t['why'] if 'why' in t else ''})")
    for name, b in report["benchmarks"].items():
        lines.append(f"  benchmark {name}: {b['status']}" + (f", ratio {_ratios(b)}" if _ratios(b) else "")
                     + (f" ({b['why']})" if "why" in b else f" in {b.get('seconds')} s"))
    lines.append(f"exact: {report['exact']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.error = _fail  # one line, no usage block
    ap.add_argument("--platform", choices=sorted(JAX_PLATFORM), default="gpu",
                    help="the backend to check (gpu: CUDA, JAX_PLATFORMS=cuda); cpu for a dry run")
    ap.add_argument("--out", default="device_check.json", help="the JSON report")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole check")
    ap.add_argument("--benchmarks", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    ap.add_argument("--appliance-cases", nargs="+", default=["smollm2:1:512", "granite3b:28:128"],
                    metavar="MODEL:USERS:CACHE", help="bench_appliance cases, each in a process of its own")
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds of every benchmark")
    a = ap.parse_args(argv)
    if not a.budget_s > 0:
        _fail(f"--budget-s must be positive, got {a.budget_s}")
    if a.rounds < 1:
        _fail(f"--rounds must be at least 1, got {a.rounds}")
    for case in a.appliance_cases:
        parts = case.split(":")
        if len(parts) != 3 or parts[0] not in APPLIANCE_MODELS or not all(p.isdigit() and int(p) > 0
                                                                            for p in parts[1:]):
            _fail(f"--appliance-cases: {case!r} is not MODEL:USERS:CACHE with MODEL one of {APPLIANCE_MODELS}")
    out = Path(a.out)
    if not out.parent.resolve().is_dir() or not os.access(out.parent.resolve(), os.W_OK):
        _fail(f"--out {a.out}: cannot write in {out.parent.resolve()}")

    t0 = time.monotonic()
    runner = Runner(JAX_PLATFORM[a.platform], a.budget_s)
    be = runner.child("backend_info()")
    if be.get("result") is None:
        why = (be.get("stderr_tail") or "").strip().splitlines()[-1:] or [be.get("why", "")]
        hint = ' (install the CUDA plugin: pip install "jax[cuda12]==<jax version>")' if a.platform == "gpu" else ""
        _fail(f"JAX cannot start the {a.platform} backend: {why[0][:300]}{hint}")
    if be["result"]["backend"] != a.platform:  # jax.default_backend() names CUDA "gpu"
        _fail(f"asked for {a.platform}, JAX started {be['result']['backend']}")
    print(f"{PROG}: {be['result']}", file=sys.stderr, flush=True)

    report = {"check": "device", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "platform": a.platform, "budget_s": a.budget_s, "backend": be["result"],
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    report["dot_forms"] = runner.child("probe()")
    print(f"{PROG}: dot forms {report['dot_forms']['status']}", file=sys.stderr, flush=True)
    report["tests"] = {}
    for group, ids in TEST_GROUPS.items():
        report["tests"][group] = run_tests(runner, ids)
        print(f"{PROG}: tests {group}: {report['tests'][group].get('status')}", file=sys.stderr, flush=True)
    cmds = {}
    if "core_array" in a.benchmarks:
        cmds["core_array"] = [sys.executable, "-c", "import json; from benchmarks import device_check as d; "
                              f"print(json.dumps(d.core_array_benchmark({a.rounds}, 5)))"]
    if "appliance" in a.benchmarks:
        cmds |= {f"appliance {c}": _appliance_cmd(c, a.rounds) for c in a.appliance_cases}
    common = ["--json", "--weights", "random", "--rounds", str(a.rounds), "--repeats", "2"]
    if "train_step" in a.benchmarks:
        cmds["train_step"] = [sys.executable, "-m", "benchmarks.bench_train_step", *common]
    if "forward" in a.benchmarks:
        cmds["forward"] = [sys.executable, "-m", "benchmarks.bench_forward", "--precisions", "w4a4", *common]
    # the largest shapes last: what the budget cuts is the most expensive
    order = sorted(cmds, key=lambda k: ("granite" in k, list(cmds).index(k)))
    report["benchmarks"] = {}
    for name in order:
        report["benchmarks"][name] = run_benchmark(runner, cmds[name])
        print(f"{PROG}: benchmark {name}: {report['benchmarks'][name]['status']}", file=sys.stderr, flush=True)

    dots = report["dot_forms"].get("result")
    report["exact"] = bool(dots and dots["exact"]) and all(t["all_passed"] for t in report["tests"].values())
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"wrote {out}")
    return 0 if report["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
