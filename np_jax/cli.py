"""The `np-jax` command line.

np_jax's own subcommands live here; packages built on np_jax (such as `models`, which adds
`run`) contribute theirs through the `np_jax.commands` entry-point group: each entry point
is a function `register(subparsers)` that adds one or more subcommands whose parsers set
`func`. np_jax itself never imports them by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

DESCRIPTION = """\
np_jax: a JAX functional emulator of IBM's NorthPole neural-inference chip and of its
16-card LLM appliance. It executes the chip's integer arithmetic bit for bit, predicts the
real appliance's speed and efficiency, and trains the quantized model with the same code.
"""

EPILOG = """\
examples:
  np-jax run                          SmolLM2-135M, w4a4, a default code prompt
  np-jax run --prompt 'def quicksort(a):' --new-tokens 64 --json
  np-jax spec --json                  every hardware figure with its source
"""


def _spec(args) -> int:
    from np_jax.spec import APPLIANCE, NORTHPOLE, PUBLISHED_RUN, sources

    data = {"chip": sources(NORTHPOLE), "appliance": {k: v for k, v in sources(APPLIANCE).items() if k != "chip"},
            "published_run": sources(PUBLISHED_RUN),
            "derived": {"n_cores": NORTHPOLE.n_cores, "core_array_sram_bytes": NORTHPOLE.core_array_sram_bytes,
                        "peak_tops": {f"int{b}": NORTHPOLE.peak_ops_s(b) / 1e12 for b in (8, 4, 2)},
                        "pcie_bytes_s_per_direction": APPLIANCE.pcie_bytes_s, "appliance_power_w": APPLIANCE.power_w}}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    for section in ("chip", "appliance", "published_run"):
        print(f"[{section}]")
        for name, f in data[section].items():
            note = f"  ({f['note']})" if f["note"] else ""
            print(f"  {name:<34} {f['value']!s:<44} {f['source']}{note}")
    d = data["derived"]
    print("[derived]")
    print(f"  cores {d['n_cores']}, core SRAM {d['core_array_sram_bytes'] / 2**20:.0f} MiB, peak TOPS "
          + ", ".join(f"{k.upper()} {v:.1f}" for k, v in d["peak_tops"].items())
          + f", PCIe {d['pcie_bytes_s_per_direction'] / 1e9:.2f} GB/s/direction, appliance {d['appliance_power_w']:.0f} W")
    return 0


def add_process_arguments(parser) -> None:
    """The multi-process flags shared by the CLI commands (`np-jax run`, `np-jax train`)."""
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-process run: the coordinator address (or JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="multi-process run: number of processes (or JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, default=None,
                        help="multi-process run: this process's index (or JAX_PROCESS_ID)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="np-jax", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("spec", help="print the chip and appliance specification with sources",
                       description="Every NorthPole and appliance figure np_jax uses, with its source.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_spec)
    for ep in sorted(entry_points(group="np_jax.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, MemoryError, OSError, KeyError, RuntimeError) as e:  # user-facing errors: one clear line
        print(f"np-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
