"""Ctrl-C (np_jax.cli): one line, exit 130, within `GRACE_S` whatever the command is doing.

Each case runs `np_jax.cli.main` in a subprocess with a toy command standing in for the situation
(a garbage-collection callback that would swallow the KeyboardInterrupt, the main thread stuck in
native code, a critical section) and sends it a real SIGINT. A real `np-jax train` interrupted
mid-save is in tests/test_train.py.
"""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from np_jax import cli

TOY = textwrap.dedent("""
    import ctypes, gc, signal, sys, threading, time, weakref
    from pathlib import Path
    from np_jax import cli

    def busy(seconds):  # Python bytecode, where a signal handler can raise
        t = time.monotonic()
        while time.monotonic() - t < seconds:
            pass

    def gc_spin(args):
        def callback(phase, info):  # as JAX's _xla_gc_callback: Python code run by the collector
            if phase == "start":
                print("in-gc", flush=True)
                time.sleep(0.3)
        gc.callbacks.append(callback)
        try:
            while True:
                gc.collect()
                busy(0.3)
        finally:
            print("finally", flush=True)

    def weakref_spin(args):
        class Obj:
            pass

        def callback(ref):  # run when the object dies; Python reports an exception here as unraisable
            print("in-callback", flush=True)
            time.sleep(0.3)
        try:
            while True:
                obj = Obj()
                ref = weakref.ref(obj, callback)
                del obj
                busy(0.3)
        finally:
            print("finally", flush=True)

    def native(args):
        # SIGINT blocked in the main thread, then a long call that releases the GIL: the Python
        # handler never runs (as during a long XLA computation); only the watchdog can act
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        tmp = Path(args.tmp)
        tmp.write_text("partial")
        sleep = ctypes.CDLL(None).sleep

        def announce():  # "ready" once the main thread is (all but surely) inside the native call
            while not in_call:
                time.sleep(0.01)
            time.sleep(0.2)
            print("ready", flush=True)

        in_call = False
        threading.Thread(target=announce, daemon=True).start()
        with cli.on_forced_exit(lambda: tmp.unlink()):
            try:
                in_call = True; sleep(60)
            finally:
                print("finally", flush=True)

    def section(args):
        with cli.interrupts_deferred():
            print("ready", flush=True)
            time.sleep(0.5)
            print("section done", flush=True)
        print("after the section", flush=True)

    def build_parser():
        p = cli.Parser(prog="np-jax")
        sub = p.add_subparsers(dest="command")
        for name, func in (("gc-spin", gc_spin), ("weakref-spin", weakref_spin), ("native", native),
                           ("section", section)):
            s = sub.add_parser(name)
            s.add_argument("--tmp")
            s.set_defaults(func=func)
        return p

    cli.build_parser = build_parser
    sys.exit(cli.main(sys.argv[1:]))
""")


def _interrupt(args: list[str], ready: str, signals: int = 1) -> tuple[int, str, str]:
    """Run the toy command, send SIGINT `signals` times once it prints `ready`; (rc, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, "-c", TOY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.strip() == ready:
            break
    for i in range(signals):
        if i:
            time.sleep(0.1)  # signals sent at once merge into one (POSIX does not queue them)
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=30)  # a hang guard: the watchdog ends it after GRACE_S
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return p.returncode, "".join(lines) + out, err


@pytest.mark.parametrize("command,ready", [("gc-spin", "in-gc"), ("weakref-spin", "in-callback")])
def test_an_interrupt_where_python_would_swallow_it_still_stops(command, ready):
    """In a gc callback (found from the handler's frame) and in a weakref callback (reported
    through sys.unraisablehook): raised again outside, no "Exception ignored" noise."""
    rc, out, err = _interrupt([command], ready)
    assert rc == 130 and err == f"np-jax {command}: interrupted\n", err
    assert "finally" in out  # delivered as a KeyboardInterrupt (not the watchdog's forced exit)


def test_watchdog_ends_a_command_stuck_in_native_code(tmp_path):
    tmp = tmp_path / "half-written"
    rc, out, err = _interrupt(["native", "--tmp", str(tmp)], "ready")
    assert rc == 130 and err == "np-jax native: interrupted\n", err
    assert "finally" not in out and not tmp.exists()  # forced exit, after the registered cleanup


def test_a_deferred_interrupt_is_raised_when_the_section_ends():
    rc, out, err = _interrupt(["section"], "ready")
    assert rc == 130 and err == "np-jax section: interrupted\n", err
    assert "section done" in out and "after the section" not in out


def test_a_second_ctrl_c_stops_at_once():
    rc, out, err = _interrupt(["section"], "ready", signals=2)
    assert rc == 130 and err == "np-jax section: interrupted\n", err
    assert "section done" not in out


def test_main_restores_the_process_state(monkeypatch, capsys):
    """In process (no signal): main leaves the SIGINT handler and unraisable hook as it found them,
    and the deferral is a no-op outside main."""
    from np_jax.commands import spec

    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    for exc in (KeyboardInterrupt, ValueError("bad")):
        def boom(args, exc=exc):
            raise exc
        monkeypatch.setattr(spec, "spec_command", boom)
        assert cli.main(["spec"]) in (130, 2)
        assert signal.getsignal(signal.SIGINT) is handler and sys.unraisablehook is hook
    assert capsys.readouterr().err.splitlines() == ["np-jax spec: interrupted", "np-jax spec: error: bad"]
    with cli.interrupts_deferred():
        pass
    with pytest.raises(KeyboardInterrupt):
        with cli.interrupts_deferred():
            raise KeyboardInterrupt
