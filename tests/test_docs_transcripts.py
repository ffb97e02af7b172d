"""The command transcripts in docs/*.md are what the commands print now (docs/transcripts.py
regenerates them). The slow ones (several compilations or a whole design-space exploration)
run with `make test-all`."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docs_transcripts", ROOT / "docs" / "transcripts.py")
transcripts = sys.modules["docs_transcripts"] = importlib.util.module_from_spec(_spec)  # its dataclass needs it there
_spec.loader.exec_module(transcripts)

ALL = [t for path in sorted((ROOT / "docs").glob("*.md")) for t in transcripts.transcripts(path)]
FAST = {"np-jax plan", "np-jax plan --model granite-3b-northpole --precision w4a4", "np-jax plan --model llama-70b"}


@pytest.mark.parametrize("t", [pytest.param(t, id=f"{t.path.name}: {t.command}",
                                            marks=() if t.command in FAST else pytest.mark.slow) for t in ALL])
def test_a_transcript_is_what_its_command_prints(t, tmp_path):
    got = transcripts.run(t.command, transcripts.scratch_tree(tmp_path))
    assert transcripts.masked(got) == transcripts.masked(t.body), f"rerun: python docs/transcripts.py {t.path}"


def test_the_performance_transcripts_are_marked():
    marked = {t.command for t in ALL if t.path.name == "performance.md"}
    assert FAST | {"np-jax perf", "np-jax plan --model granite-3b-northpole"} <= marked


def test_regenerate_rewrites_only_the_marked_blocks(tmp_path):
    cmd = "np-jax plan --model granite-3b-northpole --precision w4a4"
    doc = tmp_path / "doc.md"
    doc.write_text(f"# t\n\n<!-- transcript: {cmd} -->\n```\n$ {cmd}\nstale\n```\n\n```\n$ np-jax plan\nkept\n```\n")
    assert transcripts.regenerate(doc, cwd=tmp_path) == [cmd]
    text = doc.read_text()
    assert "stale" not in text and transcripts.run(cmd, tmp_path) in text and "kept" in text  # unmarked: untouched
    assert transcripts.regenerate(doc, cwd=tmp_path) == []  # the second run changes nothing
    doc.write_text(f"<!-- transcript: {cmd} -->\ntext\n```\nx\n```\n")
    with pytest.raises(ValueError, match="followed at once by a fenced block"):
        transcripts.transcripts(doc)
    with pytest.raises(ValueError, match="runs np-jax"):
        transcripts.run("ls -l", tmp_path)
    assert transcripts.masked("compile 1.73 s, then 6.7 ms = 1,081,843 designs/s; 1,603 feasible") == \
        "compile ... s, then ... ms = ... designs/s; 1,603 feasible"
    search = "    snapped to integers (feasible): 516 MHz, 225 cores\n          68,668 tok/s\nwrote x.png\n"
    assert transcripts.masked(search) == "    snapped to integers (feasible): ...\nwrote x.png\n"
