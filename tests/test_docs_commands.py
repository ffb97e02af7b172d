"""Every command and Python snippet in README.md and docs/*.md runs, so the docs cannot rot.

- Every `np-jax` command in a fenced block (also `$ np-jax`, `.venv/bin/np-jax`, `python -m np_jax`
  and `make run ARGS=...`) parses with the real parser: a renamed or removed flag fails in the
  fast suite, whatever the command costs to run.
- Every such command runs in-process (`np_jax.cli.main`) in one scratch folder for the module,
  made cheap by the rewrites of `plans` (below), and its output is checked where its page states
  a figure: `CHECKS`, an "exit status N" in its comment, its transcript. A command that reads a
  run directory (`--checkpoint D`, `--init-from D`) runs after the documented command that
  writes it (`--out D`), as a reader would run them.
- A backquoted command in prose names a real command and real flags; every backquoted `--flag`
  is a flag of something the docs run; `make` targets and variables exist; a benchmark
  command's flags are the benchmark's (benchmarks are never run here).
- Every ```python snippet compiles, imports only names that exist, and runs in a scratch folder.
- No documented command writes under docs/; the results tables quote their data files.

The rewrites, each for a reason:
- `run` of the pretrained SmolLM2: fast, `--dry-run` (the real model planned and its figures
  predicted; no weights loaded); slow, real generation of at most 4 tokens (the first run
  prepares the model: minutes).
- `train`, `eval` and `search` of SmolLM2 (minutes to hours): slow, on `tiny` with the documented flags;
  those of `tiny`: fast. Both with the sizes of `SMALL` (2 steps, 2 windows, 2 agreement prompts, ...).
- `--humaneval` (generated code run in subprocesses): slow, on SmolLM2 itself (a HumanEval prompt
  does not fit tiny's 128 positions); never on a checkpoint of a SmolLM2 QAT run, which would
  need that hour-long run first. `dse` compiles three searches (~20 s): slow.
- Several processes on several hosts (`--coordinator`): never run (tests/test_multiprocess.py
  runs two processes).
- The transcripts tests/test_docs_transcripts.py checks in the fast suite are not run again.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from np_jax.cli import build_parser, main
# docs/transcripts.py as that file loads it, and the transcripts it checks in the fast suite
from test_docs_transcripts import FAST as TRANSCRIPTS_TESTED, transcripts

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_NP_JAX = re.compile(r"^(?:\$ )?(?:\.venv/bin/np-jax|np-jax|python -m np_jax)(?=\s|$)")
_MAKE = re.compile(r"^(?:\$ )?make(?=\s|$)")
_BENCH = re.compile(r"^(?:\$ )?python -m (benchmarks\.\w+)(?=\s|$)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Doc:
    """A command as documented: continuation lines joined, the comment apart."""
    page: str
    line: int
    text: str
    comment: str = ""
    transcript: str | None = None  # its transcript block's body, if it is a transcript's `$` line

    @property
    def kind(self) -> str:
        return "np-jax" if _NP_JAX.match(self.text) else "make" if _MAKE.match(self.text) else "bench"

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _fenced_commands() -> list[Doc]:
    out = []
    for path in PAGES:
        text = path.read_text()
        bodies = {t.command: t.body for t in transcripts.transcripts(path)}
        for m in _FENCE.finditer(text):
            if m[1] not in ("", "sh"):
                continue
            first = text.count("\n", 0, m.start(2)) + 1
            marker = re.search(r"<!-- transcript: (.+?) -->\n\Z", text[: m.start()])
            lines = m[2].split("\n")[:1] if marker else m[2].split("\n")  # a transcript: its `$` line
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                cmd, *comment = re.split(r"\s+#(?:\s|$)", line.strip(), maxsplit=1)
                cmd, comment = " ".join(cmd.split()), "".join(comment)
                if _NP_JAX.match(cmd) or _MAKE.match(cmd) or _BENCH.match(cmd):
                    body = bodies[marker[1]] if marker else None
                    out.append(Doc(_rel(path), first + start, cmd, comment.strip(), body))
    return out


COMMANDS = _fenced_commands()
NP_JAX = [d for d in COMMANDS if d.kind == "np-jax" or d.text.startswith("make run")]


def variants(doc: Doc) -> list[tuple[list[str], str | None]]:
    """(np-jax arguments, file stdout goes to) of each form of a documented np-jax command:
    `[--json]` is both with and without, `...` (flags elided) is left out, a shell variable is 1."""
    if doc.text.startswith("make"):
        words = shlex.split(_MAKE.sub("", doc.text))
        args = dict(w.split("=", 1) for w in words if "=" in w)
        words = ["run", *shlex.split(args.get("ARGS", ""))]
    else:
        words = shlex.split(_NP_JAX.sub("", doc.text))
    stdout_to = None
    if ">" in words:
        k = words.index(">")
        words, stdout_to = words[:k], words[k + 1]
    forms = [[]]
    for w in words:
        if w == "...":
            continue
        w = "1" if w.startswith("$") else w
        if w.startswith("[") and w.endswith("]"):
            forms = [f + add for f in forms for add in ([], [w[1:-1]])]
        else:
            forms = [f + [w] for f in forms]
    return [(f, stdout_to) for f in forms]


# ---------------------------------------------------------------------------------------- parsing

@functools.cache
def parser():
    return build_parser()


def _subparsers(p) -> dict:
    acts = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
    return acts[0].choices if acts else {}


def _flags(p) -> set[str]:
    return {o for o in p._option_string_actions if o.startswith("--")}


@functools.cache
def all_np_jax_flags() -> frozenset[str]:
    seen, todo = set(), [parser()]
    while todo:
        p = todo.pop()
        seen |= _flags(p)
        todo += _subparsers(p).values()
    return frozenset(seen)


def _parse(argv: list[str]) -> str:
    """'' if `argv` parses (or asks for help), else what argparse said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser().parse_args(argv)
    except SystemExit as e:
        return "" if e.code == 0 else err.getvalue().strip() or f"exit {e.code}"
    return ""


@pytest.mark.parametrize("doc", NP_JAX, ids=str)
def test_a_documented_command_parses(doc):
    for argv, _ in variants(doc):
        assert _parse(argv) == "", f"{doc}: {_parse(argv)}"


def test_the_extraction_sees_the_docs():
    """The scan finds the commands it is about (guards against a scan that silently finds nothing)."""
    texts = {d.text for d in COMMANDS}
    assert {"make run", "np-jax map --precision a8c8w4", ".venv/bin/np-jax spec [--json]",
            "np-jax plan --model llama-70b"} <= texts
    assert any(d.transcript and d.text == "$ np-jax run --dry-run" for d in COMMANDS)
    train = next(d for d in COMMANDS
                 if d.text.startswith("np-jax train --recipe rotate-gptq --precision w4a4 --steps 60 --grad-accum 2"))
    assert train.text.endswith("--out runs/qat-w4a4-rotate") and "16.9 minutes" in train.comment  # continuation lines
    assert variants(next(d for d in COMMANDS if d.text == ".venv/bin/np-jax spec [--json]")) == \
        [(["spec"], None), (["spec", "--json"], None)]
    assert _parse(["map", "--no-such-flag"])  # the parse check can fail


# ------------------------------------------------------------------------------------------ plans

# The sizes train and eval are cut to (a documented value already smaller is kept); FORCED ones
# are added where the command leaves them at their default, the others only cut.
SMALL = {"--steps": 2, "--seq-len": 32, "--grad-accum": 1, "--calib-windows": 2, "--warmup-steps": 1, "--windows": 2,
         "--problems": 1, "--samples": 2, "--max-new-tokens": 8, "--verify": 1, "--eval-windows": 1,
         "--agreement-prompts": 2, "--agreement-tokens": 8}
FORCED = {"train": {"--steps", "--seq-len", "--grad-accum", "--calib-windows"},
          "eval": {"--windows", "--seq-len", "--calib-windows", "--agreement-prompts", "--agreement-tokens"},
          "humaneval": {"--problems", "--max-new-tokens"},
          "search": {"--windows", "--verify", "--eval-windows"}}
NEVER_RUN = {"--coordinator": "several processes on several hosts (tests/test_multiprocess.py runs two processes)"}


@dataclass(frozen=True)
class Plan:
    argv: tuple[str, ...]
    stdout_to: str | None
    slow: str  # why it is slow, '' if fast
    exact: bool  # the command as documented (its transcript applies)


def _value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def _set(argv: list[str], flag: str, value) -> list[str]:
    if flag in argv:
        k = argv.index(flag)
        return argv[:k + 1] + [str(value)] + argv[k + 2:]
    return argv + [flag, str(value)]


@functools.cache
def _producers() -> dict[str, Doc]:
    """The documented command that writes each run directory (`--out D`)."""
    return {_value(argv, "--out"): d for d in NP_JAX for argv, _ in variants(d) if "--out" in argv}


def _pretrained(argv: list[str]) -> bool:
    """Whether a run/train/eval command works on SmolLM2 (the default model), following a run
    directory it reads back to the command that wrote it."""
    for flag in ("--checkpoint", "--init-from"):
        if _value(argv, flag) in _producers():
            return _pretrained(variants(_producers()[_value(argv, flag)])[0][0])
    return _value(argv, "--model") in (None, "smollm2-135m") and "--gguf" not in argv


def plans(doc: Doc) -> list[Plan]:
    """How each form of a documented command is run (the module docstring says why)."""
    out = []
    for argv, stdout_to in variants(doc):
        if any(f in argv for f in NEVER_RUN):
            continue
        cmd = argv[0] if argv else ""
        if "--help" in argv or cmd not in ("run", "train", "eval", "dse", "search"):
            out.append(Plan(tuple(argv), stdout_to, "", True))
        elif cmd == "dse":
            out.append(Plan(tuple(argv), stdout_to, "compiles the sweep, the search and the elasticities", True))
        elif cmd == "run":
            if _pretrained(argv) and "--checkpoint" not in argv:
                dry = "--dry-run" in argv
                out.append(Plan(tuple(argv + ([] if dry else ["--dry-run"])), stdout_to, "", dry))
                if not dry:
                    real = _set(argv, "--new-tokens", min(int(_value(argv, "--new-tokens") or 48), 4))
                    out.append(Plan(tuple(real), stdout_to, "real SmolLM2 generation (prepares the model once)", False))
            else:
                out.append(Plan(tuple(argv), stdout_to, "", True))
        else:
            small, known = argv, _flags(_subparsers(parser())[cmd])
            forced = FORCED[cmd] | (FORCED["humaneval"] if "--humaneval" in argv else set())
            for flag, v in SMALL.items():
                if flag in known and (flag in argv or flag in forced):
                    small = _set(small, flag, min(v, int(_value(small, flag) or v)))
            if "--k" in small:  # pass@k needs k <= samples
                n = int(_value(small, "--samples") or 1)
                small = [str(min(int(w), n)) if i and small[i - 1] == "--k" else w for i, w in enumerate(small)]
            if "--humaneval" in argv:  # tiny's 128 positions hold no HumanEval prompt: SmolLM2 itself
                if "--checkpoint" not in argv:  # (a SmolLM2 QAT run's checkpoint: never, that run takes an hour)
                    out.append(Plan(tuple(small), stdout_to, "SmolLM2 runs generated code in subprocesses", False))
                continue
            slow = ""
            if _pretrained(argv):
                small = small if "--checkpoint" in argv or "--init-from" in argv else _set(small, "--model", "tiny")
                slow = "a SmolLM2 run of minutes to hours: its flags, on tiny"
            out.append(Plan(tuple(small), stdout_to, slow, small == argv))
    return out


def test_the_plans_do_what_the_docstring_says():
    by_text = {d.text: d for d in NP_JAX}
    make_run = plans(by_text["make run"])
    assert [(p.argv, bool(p.slow)) for p in make_run] == [(("run", "--dry-run"), False),
                                                           (("run", "--new-tokens", "4"), True)]
    qat = plans(next(d for d in NP_JAX if "--out runs/qat-w4a4-rotate" in d.text))[0]
    assert qat.slow and _value(list(qat.argv), "--model") == "tiny" and _value(list(qat.argv), "--steps") == "2"
    eval_ = plans(next(d for d in NP_JAX if d.text.startswith("np-jax eval --checkpoint runs/qat-w4a4-rotate")))[0]
    assert eval_.slow and "--model" not in eval_.argv  # its checkpoint is the tiny run the train command made
    tiny = plans(next(d for d in NP_JAX if "--out runs/tiny-float" in d.text))[0]
    assert not tiny.slow and _value(list(tiny.argv), "--steps") == "2"
    assert not plans(next(d for d in NP_JAX if "--process-id 0" in d.text))  # never run


# ------------------------------------------------------------------------------------------ runs

@dataclass(frozen=True)
class Outcome:
    argv: tuple[str, ...]
    rc: int
    out: str  # stdout and stderr together, as a terminal shows them
    stdout: str
    cwd: Path


class _Both(io.StringIO):
    def __init__(self, also: io.StringIO):
        super().__init__()
        self.also = also

    def write(self, s):
        self.also.write(s)
        return super().write(s)


class Runner:
    """Runs planned commands once each in one scratch folder (a tree with empty docs folders)."""

    def __init__(self, cwd: Path):
        self.cwd, self.done = cwd, {}

    def __call__(self, plan: Plan) -> Outcome:
        key = (plan.argv, plan.stdout_to)
        if key not in self.done:
            for flag in ("--checkpoint", "--init-from"):  # what it reads, first
                producer = _producers().get(_value(list(plan.argv), flag))
                if producer is not None:
                    self(plans(producer)[0])
            self.done[key] = self._run(plan)
        return self.done[key]

    def _run(self, plan: Plan) -> Outcome:
        both = io.StringIO()
        out, err, here = _Both(both), _Both(both), os.getcwd()
        try:
            os.chdir(self.cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(list(plan.argv))
            if plan.stdout_to:
                Path(plan.stdout_to).parent.mkdir(parents=True, exist_ok=True)
                Path(plan.stdout_to).write_text(out.getvalue())
        finally:
            os.chdir(here)
        return Outcome(plan.argv, rc, both.getvalue(), out.getvalue(), self.cwd)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(transcripts.scratch_tree(tmp_path_factory.mktemp("docs_commands")))


def _page(name: str) -> str:
    return (ROOT / name).read_text()


def _quoted(page: str, start: str) -> str:
    """The backquoted statement of `page` that starts with `start`."""
    m = re.search(r"`(" + re.escape(start) + r"[^`]*)`", _page(page))
    assert m, f"{page} no longer quotes {start!r}"
    return m[1]


def _check_map(o: Outcome):
    first = o.out.splitlines()[0]  # the comment: granite-3b-northpole, w4a4, 28 users, 2048 context
    assert first.startswith("granite-3b-northpole, w4a4, 28 users x 2048 context: 16 cards"), first


def _check_overflow(o: Outcome):
    assert _quoted("docs/appliance.md", "card 0, core (0, 0): placing") in o.out, o.out


def _check_map_json(o: Outcome):
    m = json.loads(o.stdout)
    assert (m["model"], m["users"], m["context"], len(m["cards"])) == ("smollm2-135m", 4, 512, 16)


def _check_heat_map(o: Outcome):
    assert (o.cwd / "card0.png").stat().st_size > 0 and "wrote card0.png" in o.out


def _check_perf_json(o: Outcome):
    """The keys performance.md lists for `--json`, and the figures its images show."""
    text = _page("docs/performance.md")
    para = text[text.index("`--json` gives"):]
    keys = re.findall(r"`(\w+)`", para[: para.index("\n\n")])
    assert len(keys) >= 10 and not set(keys) - set(json.loads(o.stdout)), keys
    images = {Path(p).name for p in re.findall(r"\]\(img/perf/(fig[^)]+)\)", text)}
    assert images and all((o.cwd / "plots/perf" / name).stat().st_size > 0 for name in images), images


def _check_run_help(o: Outcome):
    # the comment: model, prompts, users, new tokens, precision, calibration, cache length, --chat, --json
    for flag in ("--model", "--prompt", "--users", "--new-tokens", "--precision", "--calibration", "--cache-len",
                 "--chat", "--json"):
        assert flag in o.out, flag


def _check_default_run(o: Outcome):
    # README / index.md: SmolLM2-135M, w8a8 after the default recipe, 16 emulated cards (the plan's
    # first line, or a real run's "model ..." and "mapping: ..." lines)
    if "--dry-run" in o.argv:
        assert re.search(r"^smollm2-135m, w8a8-pdd, 1 users? x 512 context: 16 cards: .*; fits$", o.out, re.M), o.out
    else:
        assert re.search(r"^model smollm2-135m .*precision w8a8-pdd.*recipe rotate-gptq-sink\b", o.out, re.M), o.out
        assert re.search(r"^mapping: 16 cards: .*; fits", o.out, re.M), o.out


def _check_run_json(o: Outcome):
    r = json.loads(o.stdout)
    assert (r["model"], r["precision"]) == ("smollm2-135m", _value(list(o.argv), "--precision") or "w8a8-pdd")
    # a plan: the predicted figures; a real run: the keys model.md lists
    keys = {"northpole_predicted"} if "--dry-run" in o.argv else {
        "outputs", "emulator_tokens_per_s", "emulator_decode_tokens_per_s", "backend", "calibration", "kv_cache_bytes"}
    assert keys <= set(r), sorted(r)


def _check_eight_devices(o: Outcome):
    # multihost.md: 16 cards over 8 devices, 2 on each (28 users)
    if "--dry-run" in o.argv:
        assert re.search(r"^smollm2-135m, w8a8-pdd, 28 users x 512 context: 16 cards", o.out, re.M), o.out
    else:
        assert re.search(r"^mapping: 16 cards: .*; 8 JAX device", o.out, re.M), o.out


def _check_tiny_float(o: Outcome):
    assert any(p.name.isdigit() for p in (o.cwd / "runs/tiny-float").iterdir())


def _check_eval_table(o: Outcome):
    # "float vs PTQ vs QAT table"
    rows = [line.split()[0] for line in o.stdout.splitlines() if line.strip()]
    assert {"float", "ptq", "qat"} <= set(rows), o.stdout


def _check_quality(o: Outcome):
    rows = json.loads((o.cwd / "quality_smollm2.json").read_text())["rows"]
    ptq = {(r["precision"], r["recipe"]) for r in rows if not r.get("qat") and r["precision"] != "float"}
    searched = json.loads((ROOT / "docs/policies/smollm2-searched.json").read_text())["name"]
    assert ptq == {(p, "rotate-gptq") for p in ("w4a4", "w4a4-pd", "w4a4-pdd", "w4a4-p8d8", "a8c8w4", "a8c8w4-pd",
                                                "a8c8w4-pdd", "w8a8", "w8a8-pd", "w8a8-pdd", searched)}


def _check_pass_at_k(o: Outcome):
    rows = json.loads(o.stdout)["rows"]
    assert all({"pass@1", "pass@2"} <= set(r["humaneval"]["pass_at_k"]) for r in rows), rows


# Figures and facts the pages state about a command, checked against what it prints.
CHECKS = {
    "make run": _check_default_run,
    ".venv/bin/np-jax run --help": _check_run_help,
    ".venv/bin/np-jax run --precision w8a8 --new-tokens 32 --json": _check_run_json,
    "np-jax map": _check_map,
    "np-jax map --precision a8c8w4": _check_overflow,
    "np-jax map --model smollm2-135m --users 4 --context 512 --json": _check_map_json,
    "np-jax map --plot card0.png --card 0": _check_heat_map,
    "np-jax perf --json --plot plots/perf": _check_perf_json,
    "np-jax run --devices 8 --users 28 --new-tokens 64": _check_eight_devices,
    "np-jax train --model tiny --steps 200 --out runs/tiny-float": _check_tiny_float,
    "np-jax eval --checkpoint runs/qat-tiny": _check_eval_table,
    "np-jax eval --precision w4a4 --precision w4a4-pd --precision w4a4-pdd --precision w4a4-p8d8 --precision a8c8w4 "
    "--precision a8c8w4-pd --precision a8c8w4-pdd --precision w8a8 --precision w8a8-pd --precision w8a8-pdd "
    "--precision docs/policies/smollm2-searched.json --recipe rotate-gptq --windows 16 --json > quality_smollm2.json":
        _check_quality,
    "np-jax eval --humaneval --samples 10 --k 1 --k 10 --temperature 0.8 --json": _check_pass_at_k,
}


def _expected_status(doc: Doc) -> int:
    m = re.search(r"exit status (\d+)", doc.comment)
    return int(m[1]) if m else 0


RUNS = [(doc, plan) for doc in NP_JAX for plan in plans(doc) if doc.text.removeprefix("$ ") not in TRANSCRIPTS_TESTED]


@pytest.mark.parametrize("doc, plan", [pytest.param(d, p, id=f"{d} -> {' '.join(p.argv)}",
                                                    marks=[pytest.mark.slow] if p.slow else [])
                                       for d, p in RUNS])
def test_a_documented_command_runs(runner, doc, plan):
    o = runner(plan)
    assert o.rc == _expected_status(doc), f"{doc}: exit status {o.rc}\n{o.out[-3000:]}"
    if doc.transcript is not None and plan.exact:
        assert transcripts.masked(o.out if o.out.endswith("\n") else o.out + "\n") == \
            transcripts.masked(doc.transcript.partition("\n")[2]), f"rerun: python docs/transcripts.py {doc.page}"
    if doc.text in CHECKS:
        CHECKS[doc.text](o)


def test_every_check_is_of_a_documented_command():
    assert not set(CHECKS) - {d.text for d in COMMANDS}, set(CHECKS) - {d.text for d in COMMANDS}


def _outputs(doc: Doc) -> list[str]:
    return [p for argv, to in variants(doc) for p in [to, *(_value(argv, f) for f in ("--out", "--plot", "--plot-loss"))]
            if p]


def test_no_documented_command_writes_under_docs(runner):
    """No output path a command names is under docs/, and the fast runs leave the scratch
    folder's docs/ empty but for the policy files the commands read (the committed images and
    results are copied there by hand)."""
    assert not [f"{d}: {p}" for d in NP_JAX for p in _outputs(d) if Path(p).parts[0] == "docs"]
    assert {p for d in NP_JAX for p in _outputs(d)} >= {"plots/perf", "plots/dse_pareto.png", "runs/qat-tiny"}
    for _, plan in RUNS:
        if not plan.slow:
            runner(plan)
    inputs = {runner.cwd / p.relative_to(ROOT) for p in (ROOT / "docs" / "policies").glob("*.json")}
    assert not [p for p in (runner.cwd / "docs").rglob("*") if p.is_file() and p not in inputs]


# ------------------------------------------------------------------------------ prose and make

def _backquoted() -> list[tuple[str, str]]:
    """The backquoted spans of the prose (fenced blocks left out), each within two lines."""
    return [(_rel(p), m) for p in PAGES
            for m in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", _FENCE.sub("", p.read_text()))]


@functools.cache
def benchmark_flags(module: str) -> frozenset[str]:
    """The flags of a benchmark, from its --help (benchmarks are never run here)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    return frozenset(_FLAG.findall(out.getvalue()))


# Flags in the docs that belong to other tools.
OTHER_TOOLS = {"--no-deps": "pip (the Makefile's setup)", "--worker": "gcloud", "--command": "gcloud",
               "--check": "docs/transcripts.py"}


def test_prose_commands_name_real_commands_and_flags():
    """`np-jax SUB --flag ...` in prose: SUB is a command, each flag one of its own."""
    subs, bad = _subparsers(parser()), []
    for page, span in _backquoted():
        words = " ".join(span.split()).replace("\\|", "|").split()
        if not words or not _NP_JAX.match(" ".join(words)) or words[0] == "python":
            continue
        words = words[1:]
        if words and not re.fullmatch(r"[a-z]+", words[0]):  # a message: `np-jax COMMAND: error: ...`
            if not words[0].startswith("-"):
                continue
        p = parser()
        for w in words:
            if w.startswith("--"):
                bad += [f"{page}: `{span}`: {f}" for f in w.split("/") if f and f not in _flags(p)]
            elif w == "|":
                break
            elif _subparsers(p) and re.fullmatch(r"[a-z]+", w):
                if w not in _subparsers(p):
                    bad.append(f"{page}: `{span}`: no command {w!r}")
                    break
                p = _subparsers(p)[w]
    assert "run" in subs and not bad, bad


def test_every_flag_the_docs_name_exists():
    known = all_np_jax_flags() | set(OTHER_TOOLS)
    known |= {f for path in sorted((ROOT / "benchmarks").glob("*.py")) if "\ndef main(" in path.read_text()
              for f in benchmark_flags(f"benchmarks.{path.stem}")}
    named = {(page, f) for page, span in _backquoted() for f in _FLAG.findall(span)}
    assert len(named) > 50 and not sorted(x for x in named if x[1] not in known), \
        sorted(x for x in named if x[1] not in known)


def test_benchmark_commands_use_the_benchmarks_flags():
    docs = [d for d in COMMANDS if d.kind == "bench"]
    assert len(docs) >= 5
    for d in docs:
        module = _BENCH.match(d.text)[1]
        assert not set(_FLAG.findall(d.text)) - benchmark_flags(module), d


def _makefile() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", text, re.M)) | set(re.findall(r"\$\(([A-Z_]+)\)", text))
    return targets, variables


def test_make_commands_name_real_targets_and_variables():
    targets, variables = _makefile()
    spans = [d.text for d in COMMANDS if d.kind == "make"] + [s for _, s in _backquoted() if _MAKE.match(s)]
    assert {"make run", "make test", 'make run ARGS="--precision w8a8 --json"'} <= set(spans)
    for s in spans:
        words = shlex.split(_MAKE.sub("", s))
        assert all(w in targets for w in words if "=" not in w), s
        for name, value in (w.split("=", 1) for w in words if "=" in w):
            assert name in variables, s
            if name == "ARGS":
                assert _parse(["run", *shlex.split(value)]) == "", s
            if name == "PYTEST_ARGS":
                assert all((ROOT / w).exists() for w in shlex.split(value) if not w.startswith("-")), s


def test_the_documented_entry_points_are_the_packages():
    block = re.search(r"```toml\n(.*?)```", _page("docs/index.md"), re.S)[1]
    documented = tomllib.loads(block)["project"]["entry-points"]["np_jax.commands"]
    declared = tomllib.loads(_page("pyproject.toml"))["project"]["entry-points"]["np_jax.commands"]
    assert documented == declared
    assert (ROOT / "np_jax" / "__main__.py").is_file()  # `python -m np_jax`


# ----------------------------------------------------------------------------- stated figures

_UNITS = {"MHz": 1e6, "KiB": 1024, "MiB": 2 ** 20, "GB/s": 1e9, "us": 1e-6, "W": 1, "B": 1}


def _number(text: str) -> float | None:
    """The figure at the start of a table cell: '400 MHz' -> 4e8, '7.877 GB/s' -> 7.877e9."""
    m = re.match(r"\**\s*([-+]?[\d,]*\.?\d+(?:e-?\d+)?)\s*(MHz|KiB|MiB|GB/s|us|W|B)?(?![\w/])", text.strip())
    return None if not m else float(m[1].replace(",", "")) * _UNITS.get(m[2], 1)


def _table(page: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with `header`, as cells."""
    text = _page(page)
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert rows, f"{page}: no table under {header!r}"
    return rows


def test_the_parameter_table_is_what_perf_params_prints(runner):
    doc = next(d for d in NP_JAX if d.text.endswith("--params"))
    o = runner(plans(doc)[0])
    printed = {m[1]: float(m[2]) for m in re.finditer(r"^\s+(\w+)\s+([-\d.e+]+)\s", o.stdout, re.M)}
    rows = _table("docs/performance.md", "| parameter | value | source |")
    for name, value, _ in rows:
        name = name.strip("`*")
        assert name in printed, name
        assert math.isclose(_number(value), printed[name], rel_tol=1e-3), (name, value, printed[name])
    assert len(rows) >= 20


def test_the_spec_table_is_what_np_jax_spec_prints(runner):
    o = runner(Plan(("spec", "--json"), None, "", True))
    spec = json.loads(o.stdout)
    fields = {k: v["value"] for part in spec.values() if isinstance(part, dict)
              for k, v in part.items() if isinstance(v, dict) and "value" in v}
    checked = 0
    for cell, value, _ in _table("docs/chip.md", "| Field | Value | Source |"):
        names = re.findall(r"`(\w+)`", cell)
        names = [n if not n.startswith("_") else names[0].rsplit("_", 1)[0] + n for n in names]  # `_int4` shorthand
        if names == ["PUBLISHED_RUN"]:
            continue
        assert all(n in fields for n in names), names
        numbers = [_number(x) for x in re.findall(r"(?<![\w.])\d[\d,.]*(?:e\d+)?(?:\s(?:MiB|KiB))?", value)]
        if len(numbers) >= len(names) and all(isinstance(fields[n], (int, float)) for n in names):
            assert all(math.isclose(x, fields[n], rel_tol=1e-3) for n, x in zip(names, numbers)), (cell, value)
            checked += 1
    assert checked >= 8


def _shown(cell: str, value: float) -> bool:
    """Whether a table cell shows `value` to the digits it prints ('475,069', '9.42x', '0.6')."""
    text = cell.replace(",", "").rstrip("x").strip("*")
    decimals = len(text.partition(".")[2])
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


def _result(name: str) -> dict:
    return json.loads((ROOT / "docs" / "results" / name).read_text())


def _same_run(documented: str, recorded: str) -> bool:
    """The same command up to where it writes (docs/... in the record, a scratch path in the doc)."""
    def norm(s):
        words = shlex.split(s)
        return [Path(w).name if i and words[i - 1] in (">", "--plot-loss") else w for i, w in enumerate(words)]
    return norm(documented) == norm(recorded)


def test_the_quality_table_is_its_data_file():
    data = _result("quality_smollm2.json")
    rows = {(r["precision"], r["recipe"] or "-"): r for r in data["rows"]}
    table = _table("docs/quantization.md", "| Precision | Recipe | Perplexity |")
    assert len(table) == len(rows)
    for precision, recipe, ppl, vs, kl, top1, same, prepare in table:
        r = rows[(precision, recipe)]
        assert _shown(ppl, r["perplexity"]) and _shown(vs, r["vs_float"]), (precision, recipe)
        if precision == "float":
            assert (kl, top1, same, prepare) == ("-", "1.000", "64.0", "-")
            continue
        assert _shown(kl, r["kl"]) and _shown(top1, r["top1_agreement"]), (precision, recipe)
        assert _shown(same, r["same_as_float_tokens"]) and _shown(prepare, r["prepare_minutes"]), (precision, recipe)
    doc = next(d for d in NP_JAX if d.text.endswith("> quality_smollm2.json"))
    assert _same_run(doc.text, data["command"])
    assert f"{data['held_out']['tokens']:,} scored" in _page("docs/quantization.md")


def test_the_floor_table_is_its_data_file():
    data, base = _result("agreement_floor_smollm2.json"), _result("quality_smollm2.json")
    rows = {r["name"]: r for r in data["rows"]}
    table = _table("docs/quantization.md", "| Floor row | vs float |")
    assert len(table) == len(rows) - 1 and data["held_out"] == base["held_out"] and data["agreement"] == base["agreement"]
    for name, vs, kl, top1, same in table:
        r = rows[name.split(" (")[0]]
        assert _shown(vs, r["vs_float"]) and _shown(kl, r["kl"]) and _shown(top1, r["top1_agreement"]), name
        assert _shown(same, r["same_as_float_tokens"]), name
    assert f"`{data['commands'][0].split(' > ')[0]}`" in _page("docs/quantization.md").replace("\n", " ")


def test_the_sink_weight_tables_are_their_data_files():
    """Rows at W = 0 on 32 calibration windows are the results table's; the others the file's, each
    one command; the NumPy table's rows are its own file's."""
    data, base = _result("gptq_sink_weight_smollm2.json"), _result("quality_smollm2.json")
    assert data["held_out"] == base["held_out"] and data["agreement"] == base["agreement"]
    name = lambda r: r["precision"] if r["recipe"] == "rotate-gptq" else f"{r['precision']}, {r['recipe']}"  # noqa: E731
    rows = {(name(r), r["sink_weight"], r["calib_windows"]): r for r in data["rows"][1:]}
    rows |= {(r["precision"], 0, 32): r for r in base["rows"][1:] if r["recipe"] == "rotate-gptq"}
    table = _table("docs/quantization.md", "| Precision | Sink weight W | Calibration windows |")
    shown = [(p, int(w), int(c)) for p, w, c, *_ in table]
    assert len(set(shown)) == len(shown)  # every row of the file is shown, once
    assert {(name(r), r["sink_weight"], r["calib_windows"]) for r in data["rows"][1:]} <= set(shown)
    for precision, w, cw, vs, kl, top1, same in table:
        r = rows[(precision, int(w), int(cw))]
        assert _shown(vs, r["vs_float"]) and _shown(kl, r["kl"]) and _shown(top1, r["top1_agreement"]), (precision, w)
        assert _shown(same, r["same_as_float_tokens"]), (precision, w)
    for r in data["rows"][1:]:
        assert r["command"] in data["commands"] and f"gptq_sink_weight={r['sink_weight']}" in r["command"] or (
            r["sink_weight"] == 0 and "gptq_sink_weight" not in r["command"])
    numpy = _result("gptq_sink_weight_numpy.json")
    table = _table("docs/quantization.md", "| NumPy: Precision | Sink weight W |")
    assert len(table) == len(numpy["rows"]) - 1 and numpy["held_out"]["dirs"][0].endswith("numpy")
    for (precision, w, vs, kl, top1, same), r in zip(table, numpy["rows"][1:]):
        assert (precision, int(w)) == (r["precision"], r["sink_weight"]) and r["command"] in numpy["commands"]
        assert _shown(vs, r["vs_float"]) and _shown(kl, r["kl"]) and _shown(top1, r["top1_agreement"]), w
        assert _shown(same, r["same_as_float_tokens"]), w


def test_the_gptq_settings_table_is_its_data_file():
    data, base = _result("gptq_settings_smollm2.json"), _result("quality_smollm2.json")
    rows = data["rows"][1:]
    table = _table("docs/quantization.md", "| GPTQ (a8c8w4-pdd) | Perplexity |")
    assert len(table) == len(rows) and data["held_out"] == base["held_out"]
    # one float reference for both files (to float32 summation: the files come from different sessions)
    assert data["rows"][0]["perplexity"] == pytest.approx(base["rows"][0]["perplexity"], rel=1e-5)
    for (what, ppl, vs, kl, top1, same), r in zip(table, rows):
        assert what == r["gptq"] and r["precision"] == "a8c8w4-pdd", what
        assert _shown(ppl, r["perplexity"]) and _shown(vs, r["vs_float"]) and _shown(kl, r["kl"]), what
        assert _shown(top1, r["top1_agreement"]) and _shown(same, r["same_as_float_tokens"]), what
    # the ablation's default row is the results table's command, measured under the QK rotation's
    # earlier rule (off at 8-bit caches): the page says how to re-run it as measured
    assert rows[0]["command"] == base["command"] and "qk_rotation=false" in data["note"]
    documented = next(d.text for d in NP_JAX if "--recipe-option act_order=false --json" in d.text)
    assert _same_run(documented, data["commands"][0])
    for r, cmd in zip(rows[1:], data["commands"], strict=True):
        assert r["command"] == cmd and (r.get("recipe_options") or "--calib-windows" in cmd)
        assert all(f"--recipe-option {o}" in cmd for o in r.get("recipe_options", []))
        if "--calib-windows" in cmd:  # the row says what it was calibrated on
            assert f"calibrated on {cmd.split('--calib-windows ')[1].split()[0]} training windows" in r["source"]
    numpy = _result("gptq_settings_numpy.json")
    table = _table("docs/quantization.md", "| Precision | GPTQ | Perplexity |")
    assert len(table) == len(numpy["rows"]) - 1 and numpy["held_out"]["dirs"][0].endswith("numpy")
    for (precision, what, ppl, vs, kl, top1, same), r in zip(table, numpy["rows"][1:]):
        assert (precision, what) == (r["precision"], r["gptq"]) and r["command"] in numpy["commands"], what
        assert _shown(ppl, r["perplexity"]) and _shown(vs, r["vs_float"]) and _shown(kl, r["kl"]), what
        assert _shown(top1, r["top1_agreement"]) and _shown(same, r["same_as_float_tokens"]), what
        assert all(f"--recipe-option {o}" in r["command"] for o in r.get("recipe_options", [])), what


def test_the_search_table_is_its_data_file():
    data = _result("search_smollm2.json")
    table = _table("docs/codesign.md", "| point | layers | predicted ratio |")
    *verified, (_, _, w4_ratio, w4_measured, w4_tput) = table
    assert len(verified) == len(data["verified"])
    for (_, _, ratio, measured, tput), v in zip(verified, data["verified"]):
        got, kl = measured.replace("*", "").rstrip(")").split(" (")
        assert _shown(ratio, v["ratio"]) and _shown(got, v["measured"]["vs_float"]), v["name"]
        assert _shown(kl, v["measured"]["kl"]) and _shown(tput, v["throughput"]), v["name"]
    w4 = data["uniform"]["w4a4-pdd"]
    assert _shown(w4_ratio, w4["ratio"]) and _shown(w4_tput, w4["throughput"])
    # the unverified uniform point's measurement: the row of the default recipe's table, the search's recipe
    quality = {r["precision"]: r for r in _result("quality_sink_smollm2.json")["rows"]}
    assert quality["w4a4-pdd"]["recipe"] == data["recipe"]
    assert _shown(re.search(r"\(([\d.]+)x in the default recipe's table\)", w4_measured)[1],
                  quality["w4a4-pdd"]["vs_float"])


@pytest.mark.parametrize("file,recipe", [("quality_recon_smollm2.json", "rotate-gptq-recon"),
                                         ("learned_rotation_smollm2.json", "rotate-gptq-learned"),
                                         ("quality_sink_smollm2.json", "rotate-gptq-sink")])
def test_a_recipe_table_is_its_data_file(file, recipe):
    data, base = _result(file), _result("quality_smollm2.json")
    rows = {r["precision"]: r for r in data["rows"] if r["recipe"] == recipe}
    before = {r["precision"]: r for r in base["rows"] if r["recipe"] == "rotate-gptq"}
    table = _table("docs/quantization.md", f"| Precision | rotate-gptq vs float | {recipe}: Perplexity |")
    assert len(table) == len(rows)
    for precision, vs0, ppl, vs, kl, top1, same, prepare in table:
        r = rows[precision]
        assert _shown(vs0, before[precision]["vs_float"]) and _shown(ppl, r["perplexity"]), precision
        assert _shown(vs, r["vs_float"]) and _shown(kl, r["kl"]) and _shown(top1, r["top1_agreement"]), precision
        assert _shown(same, r["same_as_float_tokens"]) and _shown(prepare, r["prepare_minutes"]), precision
    doc = next(d for d in NP_JAX if d.text.endswith(f"> {file}"))
    assert _same_run(doc.text, data["command"]) and data["held_out"] == base["held_out"]
    # one float reference for both files (to float32 summation)
    assert data["rows"][0]["perplexity"] == pytest.approx(base["rows"][0]["perplexity"], rel=1e-5)


def test_the_second_corpus_table_is_its_data_file():
    """quantization.md's table of both recipes on NumPy's source: each figure is its data file's row,
    measured on that corpus by the command the page gives."""
    data = _result("quality_sink_numpy.json")
    assert data["held_out"]["dirs"][0].endswith("numpy")
    rows = {(r["precision"], r["recipe"]): r for r in data["rows"][1:]}
    table = _table("docs/quantization.md", "| Precision | rotate-gptq vs float | KL | rotate-gptq-sink vs float |")
    assert len(table) * 2 == len(rows)
    for precision, vs0, kl0, vs1, kl1, same in table:
        before, after = rows[precision, "rotate-gptq"], rows[precision, "rotate-gptq-sink"]
        assert _shown(vs0, before["vs_float"]) and _shown(kl0, before["kl"]), precision
        assert _shown(vs1, after["vs_float"]) and _shown(kl1, after["kl"]), precision
        assert all(_shown(c, r["same_as_float_tokens"]) for c, r in zip(same.split(" -> "), (before, after))), precision
    numpy = ".venv311/lib/python3.11/site-packages/numpy"
    quoted = _quoted("docs/quantization.md", f"np-jax eval --data {numpy} --precision w4a4 --")
    assert " ".join(quoted.split()) == data["command"]


def test_the_qat_starts_table_is_its_data_files():
    """codesign.md's QAT-from-each-start table: every figure is its data file's PTQ or QAT row."""
    table = _table("docs/codesign.md", "| Start (PTQ) | Precision | PTQ vs float |")
    for start, precision, ptq_vs, qat_vs, kl, same, file in table:
        rows = _result(file.strip("`"))["rows"]
        ptq, qat = (next(r for r in rows if r["precision"] == precision and bool(r.get("qat")) == q) for q in (0, 1))
        assert _shown(ptq_vs, ptq["vs_float"]) and _shown(qat_vs, qat["vs_float"]), start
        assert all(_shown(c, r["kl"]) for c, r in zip(kl.split(" -> "), (ptq, qat))), start
        assert all(_shown(c, r["same_as_float_tokens"]) for c, r in zip(same.split(" -> "), (ptq, qat))), start
        assert start.split(" (")[0].split(",")[0] == ptq["recipe"] == qat["recipe"], start


def test_the_validated_qat_runs_are_their_data_files():
    """codesign.md's validated QAT runs: each kept step is its run's least validation KL, the
    evaluated checkpoint is that step, and the figures the page quotes are the runs' rows."""
    runs = {(r["lr"], r["step_lr"]): r for r in _result("qat_validation_a8c8w4_pdd_smollm2.json")["runs"]}
    w8a8 = _result("qat_validation_w8a8_pdd_smollm2.json")
    assert next(r for r in w8a8["evaluation"]["rows"] if r.get("qat"))["step"] == w8a8["runs"][-1]["best"]["step"]
    for r in [*runs.values(), *w8a8["runs"]]:
        v = r["validation"]
        assert [x["step"] for x in v] == list(range(0, r["steps_run"] + 1, 5))[:len(v)] and len(v) >= r["steps_run"] // 5
        assert "--eval-every 5 --eval-windows 16 --keep-best kl" in r["command"]
        if "best" in r:
            least = min(v, key=lambda x: x["kl"])
            assert (r["best"]["step"], r["best"]["value"]) == (least["step"], least["kl"])
    kept = _result("qat_a8c8w4_pdd_sink_lr3e-5_smollm2.json")
    assert next(r for r in kept["rows"] if r.get("qat"))["step"] == kept["best"]["step"] == runs[3e-5, 3e-5]["best"]["step"]
    assert kept["commands"][0] == runs[3e-5, 3e-5]["command"]
    text = " ".join((ROOT / "docs" / "codesign.md").read_text().split())
    by_step = {x["step"]: x for x in runs[1e-4, 1e-4]["validation"]}
    quoted = re.search(r"the validation KL rises from the first steps, ([\d.]+) at the start, ([\d.]+) at step 10, "
                       r"([\d.]+) at step 30, ([\d.]+) at step 60", text)
    assert quoted and all(_shown(q, by_step[s]["kl"]) for q, s in zip(quoted.groups(), (0, 10, 30, 60)))
    low = {x["step"]: x for x in runs[3e-5, 3e-5]["validation"]}
    quoted = re.search(r"falls to ([\d.]+) at step (\d+) \(validation perplexity ([\d.]+)x\)", text)
    step = int(quoted.group(2))
    assert _shown(quoted.group(1), low[step]["kl"]) and _shown(quoted.group(3), low[step]["vs_float"])


def test_the_relative_step_rate_runs_are_their_data_file():
    """codesign.md's relative-rate paragraph: each run's command is its settings, the kept step is its
    least validation KL and the evaluated one, and the quoted figures are the runs' rows."""
    data = _result("qat_relative_steps_smollm2.json")
    runs = {(r["precision"], r["step_lr_mode"]): r for r in data["runs"]}
    for r in data["runs"]:
        v = r["validation"]
        assert [x["step"] for x in v] == list(range(0, r["steps_run"] + 1, 10)) and r["steps_run"] == 60
        assert ("--step-lr-mode relative" in r["command"]) == (r["step_lr_mode"] == "relative")
        assert f"--precision {r['precision']} " in r["command"] and "--lr 3e-5 " in r["command"]
        least = min(v, key=lambda x: x["kl"])
        assert (r["best"]["step"], r["best"]["value"]) == (least["step"], least["kl"])
        assert next(x for x in r["evaluation"]["rows"] if x.get("qat"))["step"] == least["step"]
        out = r["command"].split()[-1]
        assert r["evaluation"]["command"] == f"np-jax eval --checkpoint {out}/best --windows 16 --json"
    mixed = "docs/policies/smollm2-searched.json"
    ab, rel, w8 = runs[mixed, "absolute"], runs[mixed, "relative"], runs["w8a8-pdd", "relative"]
    kl = lambda r, step: next(x["kl"] for x in r["validation"] if x["step"] == step)  # noqa: E731
    text = " ".join((ROOT / "docs" / "codesign.md").read_text().split())
    q = re.search(r"absolute the validation KL goes from ([\d.]+) to ([\d.]+) at step 10 and ends at ([\d.]+) at step "
                  r"60 \(the start is kept\); at 1e-3 relative .{0,40} it is ([\d.]+) at step 10 and ([\d.]+) at "
                  r"step 60, "
                  r"the kept step, which measures on the evaluation windows ([\d.]+)x float perplexity against the "
                  r"start's ([\d.]+)x, with KL ([\d.]+) against ([\d.]+) and ([\d.]+) greedy tokens as float's against "
                  r"([\d.]+)", text)
    assert q, "codesign.md no longer quotes the relative-rate runs"
    ptq, qat = (next(x for x in rel["evaluation"]["rows"] if x["precision"] != "float" and bool(x.get("qat")) == b)
                for b in (False, True))
    want = [kl(ab, 0), kl(ab, 10), kl(ab, 60), kl(rel, 10), kl(rel, 60), qat["vs_float"], ptq["vs_float"], qat["kl"],
            ptq["kl"], qat["same_as_float_tokens"], ptq["same_as_float_tokens"]]
    assert all(_shown(c, w) for c, w in zip(q.groups(), want, strict=True)), (q.groups(), want)
    assert ab["best"]["step"] == 0 and rel["best"]["step"] == 60 and w8["best"]["step"] == 0
    q = re.search(r"keeps the start \(validation KL ([\d.]+), every later step between ([\d.]+) and ([\d.]+)\)", text)
    later = [x["kl"] for x in w8["validation"][1:]]
    assert q and all(_shown(c, w) for c, w in zip(q.groups(), (kl(w8, 0), min(later), max(later))))


def test_the_reconstruction_table_is_its_data_files():
    """quantization.md's reconstruction table: each row is its data file's row of that precision,
    recipe and options, and every data file's command names them."""
    table = _table("docs/quantization.md", "| Precision | Recipe | Options | vs float |")
    assert len(table) == 7
    for precision, recipe, options, vs, kl, top1, same, file in table:
        data = _result(file.strip("`"))
        opts = options.split(", ")
        row, = [r for r in data["rows"]
                if (r["precision"], r["recipe"], r.get("recipe_options")) == (precision, recipe, opts)]
        assert _shown(vs, row["vs_float"]) and _shown(kl, row["kl"]) and _shown(top1, row["top1_agreement"])
        assert _shown(same, row["same_as_float_tokens"])
        commands = data.get("commands") or [data["command"]]
        assert any(f"--precision {precision} " in c and f"--recipe {recipe} " in c
                   and all(f"--recipe-option {o} " in c for o in opts) for c in commands), row


def test_the_reconstruction_loss_table_is_its_data_file():
    """quantization.md's table of the reconstruction's losses: one row per row of its data file (the
    float row aside), each with that row's recipe, options and figures, and a command naming them."""
    data = _result("recon_loss_smollm2.json")
    table = _table("docs/quantization.md", "| Precision | Recipe | Recipe options | vs float |")
    rows = [r for r in data["rows"] if r["precision"] != "float"]
    assert len(table) == len(rows)
    for (precision, recipe, options, vs, kl, top1, same), row in zip(table, rows):
        opts = options.split(", ")
        assert (precision, recipe, opts) == (row["precision"], row["recipe"], row["recipe_options"])
        assert _shown(vs, row["vs_float"]) and _shown(kl, row["kl"]) and _shown(top1, row["top1_agreement"])
        assert _shown(same, row["same_as_float_tokens"])
        assert any(f"--precision {precision} " in c and f"--recipe {recipe} " in c and "--data" not in c
                   and all(f"--recipe-option {o} " in c for o in opts) for c in data["commands"]), row
    # the best w4a4 PTQ, as README and codesign.md quote it
    best, = [r for r in rows if r["precision"] == "w4a4" and r["recipe_options"] == [
        "gptq_sink_weight=16", "reconstruct=20", "reconstruct_sink_weight=1"]]
    assert f"{best['vs_float']:.2f}x with `--recipe rotate-gptq-learned --recipe-option gptq_sink_weight=16" in _page(
        "README.md")
    assert f"w4a4 reaches **{best['vs_float']:.2f}x** (KL\n  {best['kl']:.3f})" in _page("docs/codesign.md")
    plain, weighed = _result("recon_loss_numpy.json")["rows"][1:]
    assert all("--data" in c for c in _result("recon_loss_numpy.json")["commands"])
    assert weighed["recipe_options"] == plain["recipe_options"] + ["reconstruct_sink_weight=1"]
    assert (f"w4a4 goes from {plain['vs_float']:.2f}x to {weighed['vs_float']:.2f}x with the sink term (KL\n"
            f"{plain['kl']:.3f} -> {weighed['kl']:.3f}" in _page("docs/quantization.md"))


def test_the_qat_tables_are_their_data_files():
    rotate, plain = _result("qat_rotate_smollm2.json"), _result("qat_smollm2.json")
    table = _table("docs/training.md", "| Model | Precision | Steps | Train tokens | Perplexity |")
    assert len(table) == len(rotate["rows"])
    for (_, _, steps, tokens, ppl, vs, top1), r in zip(table, rotate["rows"]):
        assert _shown(ppl, r["perplexity"]) and _shown(vs, r["vs_float"])
        assert top1 == "1.000" if r["precision"] == "float" else _shown(top1, r["top1_agreement"])
        assert (steps, tokens) == ("-", "-") if not r.get("qat") else (int(steps), _number(tokens)) == (
            r["step"], r["train_tokens"])
    table = _table("docs/training.md", "| Model | Precision | Steps | Train tokens | NLL (nats/token) |")
    assert len(table) == len(plain["rows"])
    for (_, _, steps, tokens, nll, ppl, vs), r in zip(table, plain["rows"]):
        assert _shown(nll, r["nll"]) and _shown(ppl, r["perplexity"]) and _shown(vs, r["vs_float"])
    runs = [d.text for d in NP_JAX if "qat-w4a4-rotate" in d.text or "qat-w4a4-smollm2 --json" in d.text
            or "--out runs/qat-w4a4-smollm2" in d.text]
    recorded = rotate["commands"] + plain["command"]
    assert len(runs) == len(recorded) == 4 and all(_same_run(a, b) for a, b in zip(runs, recorded)), (runs, recorded)


# -------------------------------------------------------------------------------------- snippets

SNIPPETS = [(_rel(p), i + 1, code) for p in PAGES
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), re.S))]
# Snippets that run for long, with the reason.
SLOW_SNIPPETS = {("docs/training.md", 1): "trains tiny for 100 steps (~30 s)"}


def test_the_slow_snippets_exist():
    assert set(SLOW_SNIPPETS) <= {(p, i) for p, i, _ in SNIPPETS} and len(SNIPPETS) >= 5


@pytest.mark.parametrize("page, i, code", SNIPPETS, ids=[f"{p} snippet {i}" for p, i, _ in SNIPPETS])
def test_a_snippet_compiles_and_imports_what_exists(page, i, code):
    tree = ast.parse(compile(code, f"{page} snippet {i}", "exec", ast.PyCF_ONLY_AST))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for a in node.names:
                assert hasattr(module, a.name) or importlib.util.find_spec(f"{node.module}.{a.name}"), \
                    f"{page} snippet {i}: {node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                importlib.import_module(a.name)


@pytest.mark.parametrize("page, i, code", [
    pytest.param(p, i, c, id=f"{p} snippet {i}", marks=[pytest.mark.slow] if (p, i) in SLOW_SNIPPETS else [])
    for p, i, c in SNIPPETS])
def test_a_snippet_runs(tmp_path, monkeypatch, page, i, code):
    monkeypatch.chdir(tmp_path)  # what it writes (runs/x) lands there
    exec(compile(code, f"{page} snippet {i}", "exec"), {"__name__": "__doc_snippet__"})
