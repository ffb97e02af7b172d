"""np_jax.progress: a bar on a terminal, periodic lines without one, nothing when not asked; and
the long steps (preparation, evaluation) report through it."""

import threading
import time

import numpy as np

from np_jax.progress import Progress


def _wait_for(cond, limit_s=10.0):
    end = time.monotonic() + limit_s
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_without_a_terminal_lines_come_through_the_log_periodically():
    lines = []
    with Progress("GPTQ", total=7, unit="matrix", log=lines.append, every_s=0.02, tty=False) as p:
        p.update(3)
        assert _wait_for(lambda: any("GPTQ: 3/7 matrices" in x for x in lines)), lines
    n = len(lines)
    time.sleep(0.1)
    assert len(lines) == n  # closed: the heartbeat has stopped
    assert not any(t.name.startswith("progress: ") for t in threading.enumerate())


def test_a_step_without_a_count_still_says_it_is_alive():
    lines = []
    with Progress("activation steps", log=lines.append, every_s=0.02, tty=False):
        assert _wait_for(lambda: len(lines) >= 2), lines
    assert all(x.startswith("activation steps: ") and x.endswith(" s") and "/" not in x for x in lines)


def test_on_a_terminal_a_bar_and_no_log_lines(capsys):
    lines = []
    with Progress("held-out w4a4", total=4, unit="window", log=lines.append, every_s=0.02, tty=True) as p:
        p.update(4)
        time.sleep(0.1)
    assert not lines and "held-out w4a4" in capsys.readouterr().err


def test_not_asked_nothing_shown(capsys):
    with Progress("quiet", total=2, every_s=0.01, tty=True) as p:
        p.update(2)
        time.sleep(0.05)
    assert capsys.readouterr().err == "" and p.n == 2


def test_evaluation_reports_every_window():
    from models import llama
    from models.config import get_config
    from models.evaluate.perplexity import evaluate
    import jax

    cfg = get_config("tiny")
    params = llama.init_params(cfg, jax.random.key(0))
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (5, 9)).astype(np.int32)
    seen = []
    evaluate(params, cfg, "float", windows, batch_size=2, progress=seen.append)
    assert seen == [2, 2, 1]
