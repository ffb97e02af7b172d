"""`np-jax spec`: every NorthPole and appliance figure np_jax uses, with its source."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("spec", help="print the chip and appliance specification with sources",
                       description="Every NorthPole and appliance figure np_jax uses, with its source.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=spec_command)


def spec_command(args) -> int:
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
