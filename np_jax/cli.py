"""The `np-jax` command line.

Subcommands come from the `np_jax.commands` entry-point group: each entry point is a function
`register(subparsers)` that adds one or more subcommands whose parsers set `func`. np_jax's own
(`spec`, `map`, `perf`, `dse`, `plan`, in np_jax.commands) are registered the same way as those
of packages built on np_jax (such as `models`, which adds `run`, `train` and `eval`). Named model
shapes come from the `np_jax.models` entry-point group (a function returning {name: shape}), so
np_jax never imports a model package by name.

Every user-facing error is one line on stderr, `np-jax <command>: error: ...`, with exit status
2; Ctrl-C prints one line and exits with 130; a closed stdout (`np-jax map | head -1`) ends the
command quietly, as a Unix tool does.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    """Defaults appended to each flag's help (once: not where the help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS):
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


def count(text: str) -> int:
    """argparse type of a count flag: a whole number >= 1 (zero is never silently a default)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_rotation_argument(parser) -> None:
    """`--rotations` of `map` and `perf`: map and charge the online Hadamards a recipe adds."""
    parser.add_argument("--rotations", choices=("none", "recipe"), default="none",
                        help="none: the model as published; recipe: with the online Hadamards of the default "
                             "quantization recipe (an INT2 +-1 matrix on q and k when the KV cache is below 8 bits, "
                             "the down-projection input's Kronecker factors), placed in core memory and charged "
                             "as INT8 x INT2 VMMs (what `np-jax run` executes; docs/quantization.md)")


def shape_with_rotations(shape, policy, rotations: str):
    """`shape` with the online rotations `--rotations` names (np_jax.quant's rules)."""
    if rotations == "none":
        return shape
    import dataclasses

    from np_jax.quant import hadamard, wants_qk_rotation

    try:
        return dataclasses.replace(shape, qk_rotation=wants_qk_rotation(policy), down_rotation=hadamard.factors(shape.d_ff))
    except TypeError:
        raise ValueError(f"model {shape.name} has no online-rotation settings (qk_rotation, down_rotation)") from None


def add_process_arguments(parser) -> None:
    """The multi-process flags shared by the CLI commands (`np-jax run`, `np-jax train`)."""
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-process run: the coordinator address (or JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=count, default=None,
                        help="multi-process run: number of processes (or JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, default=None,
                        help="multi-process run: this process's index (or JAX_PROCESS_ID)")


def add_mapping_arguments(parser, *, users: int | None, cards: int = 16) -> None:
    """The flags that choose a mapping, shared by `map`, `perf` and `run`."""
    parser.add_argument("--users", type=count, default=users, help="users N (the mini-batch)")
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
    for ep in sorted(entry_points(group="np_jax.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def cache_dir() -> Path:
    """np_jax's cache folder: $NP_JAX_CACHE, else $XDG_CACHE_HOME/np_jax (default ~/.cache/np_jax)."""
    if os.environ.get("NP_JAX_CACHE"):
        return Path(os.environ["NP_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "np_jax"


def main(argv: list[str] | None = None) -> int:
    # JAX's persistent compilation cache makes a command's second run start in seconds (it stores
    # compiled executables only: results are unchanged). An explicit JAX setting wins.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (argparse printed one line) or --help
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"np-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a Unix tool does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except (ValueError, MemoryError, OSError, KeyError, RuntimeError) as e:  # user-facing errors: one clear line
        msg = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
        print(f"np-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
