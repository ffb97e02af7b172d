"""The `np-jax` command line.

Subcommands come from the `np_jax.commands` entry-point group: each entry point is a function
`register(subparsers)` that adds one or more subcommands whose parsers set `func`. np_jax's own
(`spec`, `map`, `perf`, `dse`, `plan`, in np_jax.commands) are registered the same way as those
of packages built on np_jax (such as `models`, which adds `run`, `train` and `eval`). Named model
shapes come from the `np_jax.models` entry-point group (a function returning {name: shape}), so
np_jax never imports a model package by name.

Every user-facing error is one line on stderr, `np-jax <command>: error: ...`, with exit status
2; a closed stdout (`np-jax map | head -1`) ends the command quietly, as a Unix tool does.

Ctrl-C prints one line, `np-jax <command>: interrupted`, and exits with 130 within `GRACE_S`
seconds, whatever the command is doing. `main` installs its own SIGINT handler, which raises
KeyboardInterrupt, except where Python would swallow it: in a garbage-collection callback (JAX
registers one, and during long XLA work it is often the first Python code to run after the
signal) or in a `__del__`; there it is raised again moments later, as it is when a library reports
a swallowed one through `sys.unraisablehook`. A watchdog thread, woken through
`signal.set_wakeup_fd` the moment the signal arrives (the Python-level handler runs only when the
main thread next runs Python code, which can be after seconds of XLA work), ends the process with
`os._exit(130)` if it is still running `GRACE_S` after the signal, after running the cleanups
registered with `on_forced_exit`; a second Ctrl-C ends it at once the same way. Once it has
reported the interrupt, the main thread ends the process itself (atexit handlers run, not the
interpreter's slow teardown of JAX). `interrupts_deferred` holds an interrupt back during a short
critical section (a checkpoint save), raising it when the section ends.
"""

from __future__ import annotations

import _thread
import argparse
import atexit
import contextlib
import gc
import math
import os
import signal
import sys
import textwrap
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

DESCRIPTION = """\
np_jax: a JAX functional emulator of IBM's NorthPole neural-inference chip and of its
16-card LLM appliance. It executes the chip's integer arithmetic bit for bit, predicts the
real appliance's speed and efficiency, and trains the quantized model with the same code.
"""

EPILOG = """\
examples:
  np-jax run                          SmolLM2-135M, a default code prompt, 16 emulated cards
  np-jax run --prompt 'def quicksort(a):' --new-tokens 64 --json
  np-jax map --model granite-3b-northpole   the published mapping: cards, cores, bytes
  np-jax perf                         the published run's predicted Table I
  np-jax spec --json                  every hardware figure with its source
"""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each flag's help (once: not where the help already says it); a
    description's prose paragraphs wrapped to the terminal, its indented lines (examples, tables)
    kept as written."""

    def _fill_text(self, text, width, indent):
        out = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines):  # examples: as written
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)

    def _split_lines(self, text, width):
        # a flag's help wrapped at spaces only: names such as rotate-gptq-recon stay whole
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        # identity, not equality: a default of 0 (`--seed 0`, `--card 0`) is shown; None, False and
        # SUPPRESS mean "no value to show"
        if "%(default)" in text or "default:" in text or any(action.default is d for d in (None, False,
                                                                                         argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def model_shapes() -> dict:
    """Named model shapes contributed by installed packages (entry-point group `np_jax.models`)."""
    out: dict = {}
    for ep in sorted(entry_points(group="np_jax.models"), key=lambda e: e.name):
        out.update(ep.load()())
    return out


def get_shape(name: str):
    """The named model shape (any object with np_jax.appliance.mapping.DecoderShape's attributes)."""
    shapes = model_shapes()
    if name not in shapes:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(shapes) or '(none installed)'}")
    return shapes[name]


def positive(name: str, value, *, upper: int | None = None, why: str = "") -> int:
    """`value` as an int in [1, upper], else ValueError naming the flag (and the bound's reason)."""
    if value is None or int(value) < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")
    if upper is not None and int(value) > upper:
        raise ValueError(f"--{name} {value} is above the limit of {upper:,}" + (f" ({why})" if why else ""))
    return int(value)


def _whole(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
    return v


def count(text: str) -> int:
    """argparse type of a count flag: a whole number >= 1 (zero is never silently a default)."""
    return _whole(text, 1)


def count_or_zero(text: str) -> int:
    """argparse type of a count where 0 turns the work off: a whole number >= 0."""
    return _whole(text, 0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (a rate, a scale): NaN and infinity are refused."""
    v = _number(text)
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def nonnegative_number(text: str) -> float:
    """argparse type: a finite number >= 0 (where 0 means none or off)."""
    v = _number(text)
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    v = _number(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def add_rotation_argument(parser) -> None:
    """`--rotations` of `map` and `perf`: map and charge the online Hadamards a recipe adds."""
    parser.add_argument("--rotations", choices=("none", "recipe"), default="none",
                        help="none: the model as published; recipe: with the online Hadamards of the default "
                             "quantization recipe (an INT2 +-1 matrix on q and k when the KV cache is quantized, "
                             "the down-projection input's Kronecker factors), placed in core memory and charged "
                             "as INT8 x INT2 VMMs (what `np-jax run` executes; docs/quantization.md)")


def shape_with_rotations(shape, policy, rotations: str):
    """`shape` with the online rotations `--rotations` names (np_jax.quant's rules)."""
    if rotations == "none":
        return shape
    import dataclasses

    from np_jax.quant import hadamard, wants_qk_rotation

    try:
        return dataclasses.replace(shape, qk_rotation=wants_qk_rotation(policy, shape.n_layers),
                                   down_rotation=hadamard.factors(shape.d_ff))
    except TypeError:
        raise ValueError(f"model {shape.name} has no online-rotation settings (qk_rotation, down_rotation)") from None


# The integer precision policies (np_jax.quant.policy.POLICIES less "float"), spelled out so that
# `--help` needs no JAX import; tests/test_perf.py keeps the list equal to the policies.
PRECISIONS = ("w4a4", "a8c8w4", "w8a8", "w4a4-p8", "w4a4-p8d8", "a8c8w4-dyn", "w8a8-dyn", "w4a4-pd", "a8c8w4-pd",
              "w8a8-pd", "w4a4-pdd", "a8c8w4-pdd", "w8a8-pdd")


def precision_type(names: tuple[str, ...]):
    """An argparse type: one of the precision `names`, or a policy file (.json, checked now:
    np_jax.quant.policy.load_policy)."""
    def precision(value: str) -> str:
        if value in names:
            return value
        if value.endswith(".json"):
            from np_jax.quant.policy import load_policy  # imports JAX: only when a file is given
            try:
                load_policy(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            return value
        raise argparse.ArgumentTypeError(f"unknown precision {value!r}; choose one of {', '.join(names)}, or a "
                                         "policy file (.json; docs/codesign.md)")
    precision.__name__ = "precision"
    return precision


def add_process_arguments(parser) -> None:
    """The multi-process flags shared by the CLI commands (`np-jax run`, `np-jax train`)."""
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-process run: the coordinator address (default: JAX_COORDINATOR_ADDRESS, else "
                             "none: one process)")
    parser.add_argument("--num-processes", type=count, default=None,
                        help="multi-process run: number of processes (default: JAX_NUM_PROCESSES, else 1)")
    parser.add_argument("--process-id", type=int, default=None,
                        help="multi-process run: this process's index (default: JAX_PROCESS_ID, else 0)")


def add_mapping_arguments(parser, *, users: int | None, cards: int = 16, users_default: str | None = None) -> None:
    """The flags that choose a mapping, shared by `map`, `perf` and `run`. `users_default` words a
    default that is not a number (`users=None`)."""
    parser.add_argument("--users", type=count, default=users,
                        help="users N (the mini-batch)" + (f" (default: {users_default})" if users_default else ""))
    parser.add_argument("--cards", type=count, default=cards, help="cards in the appliance")
    parser.add_argument("--micro-batches", type=count, default=None,
                        help="micro-batches M (default: the count with the best predicted throughput)")
    parser.add_argument("--output-cards", "--head-cards", dest="output_cards", type=count, default=None,
                        help="cards for the output layer (default: the count with the best predicted throughput, "
                             "at least the fewest that fit)")
    parser.add_argument("--layer-cards", type=count, default=None,
                        help="cards for the layers (default: the count with the best predicted throughput; the "
                             "cards left over stay idle)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`np-jax run: error: argument --users: must be >= 1, got 0`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="np-jax", description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # the main job first, then the rest in the order a newcomer meets them; unknown plug-ins last
    order = ("run", "train", "map", "perf", "spec", "cache", "sensitivity", "search")
    for ep in sorted(entry_points(group="np_jax.commands"),
                     key=lambda e: (order.index(e.name) if e.name in order else len(order), e.name)):
        ep.load()(sub)
    return parser


def cache_dir() -> Path:
    """np_jax's cache folder: $NP_JAX_CACHE, else $XDG_CACHE_HOME/np_jax (default ~/.cache/np_jax)."""
    if os.environ.get("NP_JAX_CACHE"):
        return Path(os.environ["NP_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "np_jax"


GRACE_S = 1.5  # Ctrl-C ends the process within this many seconds, whatever it is doing


class _Interrupt:
    """Ctrl-C handling of one `main` call (see the module docstring)."""

    def __init__(self, command: str):
        self.command = command
        self.at: float | None = None   # when the first SIGINT arrived (time.monotonic)
        self.lock = threading.RLock()  # the main thread and the watchdog both may report
        self.reported = False
        self.deferred = 0              # depth of `interrupts_deferred` sections
        self.pending = False           # an interrupt held back by such a section
        self.retry = False             # an interrupt not delivered (a swallowing context): raise it again
        self.redelivered = False       # the next SIGINT is the watchdog's re-delivery, not a second Ctrl-C
        self.seen = False              # the handler has run for a Ctrl-C
        self.unraisable_hook = sys.unraisablehook

    def report(self, *, forced: bool = False) -> None:
        """The one line, once. A forced exit writes to the file descriptor: the main thread may hold
        sys.stderr's lock."""
        line = f"np-jax{' ' + self.command if self.command else ''}: interrupted"
        locked = self.lock.acquire(timeout=0.2 if forced else -1)  # forced: never wait on a stuck main thread
        try:
            if self.reported:
                return
            self.reported = True
            if forced:
                os.write(2, (line + "\n").encode())
            else:
                print(line, file=sys.stderr, flush=True)
        finally:
            if locked:
                self.lock.release()


_active: _Interrupt | None = None
_cleanups: dict[int, object] = {}


@contextlib.contextmanager
def on_forced_exit(cleanup):
    """Run `cleanup()` if Ctrl-C's watchdog ends the process while inside this block.

    The normal path (KeyboardInterrupt, `finally` blocks) does not call it: it is for what a
    `finally` would have done (remove a temporary file, release a lock file) when the process is
    ended from outside the main thread. It must be quick and safe to run from another thread.
    """
    key = id(cleanup)
    _cleanups[key] = cleanup
    try:
        yield
    finally:
        _cleanups.pop(key, None)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C back until the block ends (then raise KeyboardInterrupt), for a short critical
    section such as a checkpoint save; the watchdog still ends the process `GRACE_S` after the
    signal. A no-op outside `main`."""
    st = _active
    if st is None:
        yield
        return
    st.deferred += 1
    try:
        yield
    finally:
        st.deferred -= 1
        if not st.deferred and st.pending:
            st.pending = False
            raise KeyboardInterrupt


def _forced_exit(st: _Interrupt) -> None:
    st.report(forced=True)
    for cleanup in list(_cleanups.values()):
        try:
            cleanup()
        except BaseException:  # noqa: BLE001 - best effort: the process ends either way
            pass
    os._exit(130)


def _swallowing(frame) -> bool:
    """Whether an exception raised in `frame` would be swallowed: it runs inside a garbage-collection
    callback or a `__del__` (Python prints "Exception ignored in ..." and carries on)."""
    callbacks = {getattr(getattr(cb, "__func__", cb), "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


_STOP = b"\0"  # written to the watchdog's pipe when the command ends (no signal has number 0)


def _watchdog(st: _Interrupt, fd: int) -> None:
    """Wait for a SIGINT on the signal wakeup pipe (written by the C-level handler the moment the
    signal arrives, even while the main thread runs native code), then end the process `GRACE_S`
    later unless the main thread has ended it; meanwhile raise again an interrupt that was not
    delivered."""
    while True:
        data = os.read(fd, 512)
        if not data or _STOP in data:
            return
        if signal.SIGINT in data:
            break
    with st.lock:
        st.at = st.at if st.at is not None else time.monotonic()
    while time.monotonic() - st.at < GRACE_S:
        time.sleep(0.02)
        if st.retry and _active is st:
            st.retry, st.redelivered = False, True
            _thread.interrupt_main(signal.SIGINT)
    _forced_exit(st)


def _on_sigint(signum, frame) -> None:
    st = _active
    with st.lock:
        st.at = st.at if st.at is not None else time.monotonic()
    if st.redelivered:
        st.redelivered = False
    elif st.seen:  # a second Ctrl-C: stop now
        _forced_exit(st)
    st.seen = True
    if st.deferred:
        st.pending = True
    elif _swallowing(frame):
        st.retry = True
    else:
        raise KeyboardInterrupt


def _on_unraisable(unraisable) -> None:
    st = _active
    if st is not None and st.at is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        st.retry = True  # our KeyboardInterrupt was swallowed: the watchdog raises it again
        return
    (st.unraisable_hook if st is not None else sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def _interrupt_handling(command: str):
    """Install the SIGINT handler, the signal wakeup pipe and its watchdog, and the unraisable hook
    for one command (main thread only: elsewhere Python allows no signal handler)."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield _Interrupt(command)
        return
    st, outer = _Interrupt(command), _active
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)  # the wakeup fd must not block the C-level handler
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    old_handler = signal.signal(signal.SIGINT, _on_sigint)
    _active, sys.unraisablehook = st, _on_unraisable
    watchdog = threading.Thread(target=_watchdog, args=(st, rfd), name="np-jax-interrupt", daemon=True)
    watchdog.start()
    try:
        yield st
    finally:
        signal.signal(signal.SIGINT, old_handler)
        signal.set_wakeup_fd(old_wakeup)
        _active, sys.unraisablehook = outer, st.unraisable_hook
        if st.at is None:  # (after a Ctrl-C the watchdog stays, to end the process if it lingers)
            os.write(wfd, _STOP)
            watchdog.join()
            os.close(rfd)
        os.close(wfd)


def main(argv: list[str] | None = None) -> int:
    # JAX's persistent compilation cache makes a command's second run start in seconds (it stores
    # compiled executables only: results are unchanged). An explicit JAX setting wins.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
    # every program, the small ones too: a second run's load is mostly many small compilations
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
    with _interrupt_handling(command) as st:
        try:
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as e:  # a usage error (argparse printed one line) or --help
                return e.code if isinstance(e.code, int) else 2
            if not getattr(args, "func", None):
                parser.print_help()
                return 0
            st.command = args.command
            rc = int(args.func(args) or 0)
            return _interrupted(st) if st.at is not None else rc  # a Ctrl-C the command outran still counts
        except KeyboardInterrupt:
            return _interrupted(st)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a Unix tool does
            if st.at is not None:
                return _interrupted(st)
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except OSError:
                pass
            return 141
        except (ValueError, MemoryError, OSError, KeyError, RuntimeError) as e:  # user-facing errors: one clear line
            if st.at is not None:  # the interrupt surfaced as another error (through native code)
                return _interrupted(st)
            msg = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
            print(f"np-jax {st.command}: error: {msg}", file=sys.stderr)
            return 2
        except Exception:
            if st.at is not None:
                return _interrupted(st)
            raise


def _interrupted(st: _Interrupt) -> int:
    """Report the interrupt; after a real Ctrl-C, end the process here: the atexit handlers run, but
    not the interpreter's teardown of JAX, which alone can take longer than `GRACE_S`."""
    st.report()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if st.at is not None:
        atexit._run_exitfuncs()
        os._exit(130)
    return 130


if __name__ == "__main__":
    sys.exit(main())
