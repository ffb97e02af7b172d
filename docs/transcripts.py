"""Regenerate the command transcripts in docs/*.md from the commands as they are.

A transcript is the fenced block right after a marker line:

    <!-- transcript: np-jax plan --model llama-70b -->
    ```
    $ np-jax plan --model llama-70b
    (what the command prints)
    ```

`python docs/transcripts.py` runs every marked command in-process (`np_jax.cli.main`, in a
scratch folder, so that what a command writes never lands in the repository; stdout and stderr
together) and rewrites its block; `--check` rewrites nothing and exits 1 naming the blocks
that differ. It masks
what the machine decides: measured times (the DSE's compile and run times), and the end points
of the DSE's gradient search, whose 300 steps amplify float rounding that differs between XLA
builds (jax 0.10 and 0.12 end at 520 and 516 MHz). A command that exits non-zero is an error: a
transcript shows a command that works.

    python docs/transcripts.py [--check] [FILE.md ...]      # default: every docs/*.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = "np-jax"

_BLOCK = re.compile(r"^<!-- transcript: (?P<cmd>[^\n]+?) -->\n```[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"^<!-- transcript:", re.M)
# What a machine's speed decides: "compile 1.73 s, then 6.7 ms = 1,081,843 designs/s"
_TIMING = re.compile(r"compile [\d.]+ s, then [\d.]+ ms = [\d,]+ ")
# Where the DSE's gradient search ends (300 Adam steps amplify the last bit of float rounding,
# which differs between XLA builds and optimisation flags): the end point and its metrics line
_SEARCH_END = re.compile(r"^(    (?:continuous optimum|snapped to integers)[^:\n]*:).*\n.*$", re.M)


@dataclass(frozen=True)
class Transcript:
    path: Path
    command: str
    body: str  # the block as it stands: "$ command\n" and the output
    span: tuple[int, int]  # of the body in the file's text


def transcripts(path: Path) -> list[Transcript]:
    """The marked blocks of one file; a marker without a fenced block right after it is an error."""
    text = path.read_text()
    found = [Transcript(path, m["cmd"], m["body"], m.span("body")) for m in _BLOCK.finditer(text)]
    if len(found) != len(_MARKER.findall(text)):
        raise ValueError(f"{path}: a transcript marker must be followed at once by a fenced block")
    return found


def run(command: str, cwd: Path = ROOT) -> str:
    """`$ command` and what it prints, run in-process in `cwd` (relative output paths land there)."""
    from np_jax.cli import main

    args = shlex.split(command)
    if not args or args[0] != PROGRAM:
        raise ValueError(f"a transcript runs {PROGRAM}, got {command!r}")
    out, here = io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = main(args[1:])
    finally:
        os.chdir(here)
    text = out.getvalue()
    if rc:
        raise RuntimeError(f"{command!r} exited with status {rc}:\n{text}")
    return f"$ {command}\n" + text + ("" if text.endswith("\n") or not text else "\n")


def scratch_tree(into: Path) -> Path:
    """`into` with the repository's docs folders, empty but for the example policy files the
    commands read (docs/policies): a working directory where the commands' relative paths
    (docs/img/..., docs/policies/...) resolve without touching the repository."""
    for d in [ROOT / "docs", *(p for p in (ROOT / "docs").rglob("*") if p.is_dir())]:
        (into / d.relative_to(ROOT)).mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "docs" / "policies").glob("*.json"):
        (into / f.relative_to(ROOT)).write_bytes(f.read_bytes())
    return into


def masked(body: str) -> str:
    """The block with its measured times and the gradient search's end points masked (what
    --check and the tests compare)."""
    return _SEARCH_END.sub(r"\1 ...", _TIMING.sub("compile ... s, then ... ms = ... ", body))


def regenerate(path: Path, cwd: Path = ROOT) -> list[str]:
    """Rerun every marked command of `path` and rewrite the blocks; the commands whose block changed."""
    text = path.read_text()
    changed = []
    for t in reversed(transcripts(path)):  # from the end, so the earlier spans stay valid
        new = run(t.command, cwd)
        if new != t.body:
            changed.append(t.command)
            text = text[: t.span[0]] + new + text[t.span[1]:]
    if changed:
        path.write_text(text)
    return changed[::-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="Markdown files (default: docs/*.md)")
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a block differs")
    args = ap.parse_args(argv)
    files = args.files or sorted((ROOT / "docs").glob("*.md"))
    stale = []
    with tempfile.TemporaryDirectory() as scratch:
        cwd = scratch_tree(Path(scratch))  # what the commands write goes there
        for path in files:
            if args.check:
                stale += [f"{path}: {t.command}" for t in transcripts(path)
                          if masked(run(t.command, cwd)) != masked(t.body)]
            else:
                stale += [f"{path}: {c}" for c in regenerate(path, cwd)]
    for s in stale:
        print(("differs: " if args.check else "rewrote: ") + s)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
