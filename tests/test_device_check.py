"""The device check (benchmarks/device_check.py): its dot-form probe on this backend, its test
counts, budget and bad input. The whole check runs on a device (docs/benchmarks.md)."""

import subprocess
import sys

import pytest

from benchmarks import device_check as dc
from np_jax.chip import array as na


@pytest.fixture(scope="module")
def probe():
    return dc.probe()


def test_probe_finds_every_form_exact_and_records_the_dots_it_ran(probe):
    assert probe["exact"] and all(c["ok"] and c["exact"] for c in probe["forms"] + probe["default_path"])
    held = {"int8": "int8 x int8 -> int32", "float32": "float32 x float32 -> float32 HIGHEST"}
    for c in probe["forms"]:
        if c["form"] in held:
            assert set(c["dots"]) == {held[c["form"]]}, c
        else:  # float32-held codes past 2^24: int_dot took the int8 dot
            assert c["dots"] == [held["int8"]], c
    bounds = {(c["form"], c["x_bits"]): c for c in probe["forms"]
              if c["check"] == "int_dot" and c["codes"] == "extreme"}
    assert bounds[("int8", 8)]["max_abs_sum"] == bounds[("int8", 8)]["bound"] == 131071 * 2**14  # reached
    assert bounds[("float32", 8)]["max_abs_sum"] == 1023 * 2**14 < 2**24
    assert bounds[("float32", 4)]["max_abs_sum"] == (2**18 - 1) * 2**6 < 2**24
    net = [c for c in probe["forms"] if c["check"].startswith("array_vmm")]
    assert [c["form"] for c in net] == ["int8", "float32"] and not any(c["whole_k_dot"] for c in net)
    assert net[0]["saturated"]
    for c in probe["default_path"]:
        assert c["form"] == na.dot_form(c["rows"]) and c["dots"] == [held[c["form"]]] and c["whole_k_dot"]
    # the oracle tells an inexact dot from an exact one: a float32 dot past 2^24 rounds
    assert probe["control"]["ok"] and not probe["control"]["exact"] and probe["control"]["max_abs_error"] > 0


def test_a_form_that_fails_is_recorded_not_raised():
    def broken():
        raise RuntimeError("UNIMPLEMENTED: dot\nsecond line")

    assert dc._case({"form": "int8"}, broken) == {"form": "int8", "ok": False, "exact": False,
                                                   "error": "RuntimeError: UNIMPLEMENTED: dot"}


def test_test_counts_come_from_the_junit_report(tmp_path):
    f = tmp_path / "test_sample.py"
    f.write_text("def test_passes():\n    assert True\n\n\ndef test_fails():\n    assert False\n")
    runner = dc.Runner("cpu", 120)
    r = dc.run_tests(runner, [f"{f}::test_passes", f"{f}::test_fails"])
    assert (r["passed"], r["failed"], r["errors"]) == (1, 1, 0) and not r["all_passed"]
    assert r["failures"] == ["test_sample::test_fails"]
    r = dc.run_tests(runner, [f"{f}::test_passes"])
    assert r["passed"] == 1 and r["all_passed"]
    r = dc.run_tests(runner, [f"{f}::test_renamed"])  # a test that is gone is a failure, not a pass
    assert r["passed"] == 0 and not r["all_passed"]


def test_a_step_is_stopped_at_the_budget_and_not_started_without_one(monkeypatch):
    monkeypatch.setattr(dc, "MIN_STEP_S", 0)
    r = dc.Runner("cpu", 1).run([sys.executable, "-c", "import time; time.sleep(60)"])
    assert r["timed_out"] and r["seconds"] < 30
    monkeypatch.setattr(dc, "MIN_STEP_S", 20)
    assert dc.Runner("cpu", 10).run([sys.executable, "-c", "pass"])["status"] == "not run"


def test_last_json_skips_log_lines():
    assert dc._last_json('log line\n{"a": 1}\nmore\n{\n  "b": {\n    "c": 2\n  }\n}\n') == {"b": {"c": 2}}
    assert dc._last_json("no JSON here\n{ broken") is None


@pytest.mark.parametrize("args,match", [
    (["--budget-s", "0"], "--budget-s must be positive"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--appliance-cases", "smollm2:1"], "MODEL:USERS:CACHE"),
    (["--appliance-cases", "llama:1:512"], "MODEL:USERS:CACHE"),
    (["--out", "/nonexistent/dir/check.json"], "cannot write"),
    (["--platform", "tpu"], "invalid choice"),
])
def test_bad_input_is_one_line_before_any_step(args, match, capsys, monkeypatch):
    def no_child(*a, **k):
        raise AssertionError("a step started")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    with pytest.raises(SystemExit) as e:
        dc.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and err.startswith(f"{dc.PROG}: error: ") and err.count("\n") == 1
