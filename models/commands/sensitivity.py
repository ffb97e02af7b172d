"""`np-jax sensitivity`: what lowering each layer's weight roles from 8 to 4 bits costs in held-out
loss, estimated from the integer forward's gradients and checked by measurement (models.sensitivity).

Registered into the `np-jax` CLI through the `np_jax.commands` entry point (`register`).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from models.commands.train import RECIPES  # models.recipe.RECIPES, spelled out once there: --help imports no JAX
from np_jax.cli import Formatter, count, precision_type, PRECISIONS


def _writable(flag: str, path: str, suffix: str) -> Path:
    """`path` (with `suffix` added when missing), checked writable now: a bad path is refused before
    the minutes of work, not after them."""
    p = Path(path).expanduser()
    if p.suffix.lower() != suffix:
        p = p.with_name(p.name + suffix)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    existing = next(a for a in p.absolute().parents if a.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None
    return p


def register(sub) -> None:
    p = sub.add_parser(
        "sensitivity", help="per-layer 8->4-bit weight sensitivity: gradient estimate vs measurement",
        description="For every layer and weight role, estimate the held-out NLL increase of lowering it from 8 "
                    "to 4 bits (Fisher diagonal of the integer forward times the squared weight change; one "
                    "backward pass per window for all layers), measure it for a sample of entries (that entry "
                    "at 4 bits, held-out NLL) and report Spearman's rank correlation. Writes JSON and a "
                    "layers x roles heat map.",
        formatter_class=Formatter)
    p.add_argument("--model", default="smollm2-135m", help="a named config; smollm2-135m is read from its GGUF")
    p.add_argument("--gguf", default=None, help="GGUF file of the model (default: the installed one)")
    p.add_argument("--precision", default="w8a8", type=precision_type(PRECISIONS),
                   help="the starting policy; its weights must be 8-bit per channel (default: w8a8)")
    p.add_argument("--recipe", default="rotate-gptq-sink", choices=RECIPES, metavar="RECIPE",
                   help=f"how the model is prepared: {', '.join(RECIPES)} (docs/quantization.md)")
    p.add_argument("--fisher-windows", type=count, default=16, help="held-out windows of the gradient estimate")
    p.add_argument("--windows", type=count, default=32, help="further held-out windows of each measurement")
    p.add_argument("--seq-len", type=count, default=128, help="tokens per window")
    p.add_argument("--sample", type=count, default=12, help="entries measured directly")
    p.add_argument("--batch-size", type=count, default=4, help="windows per evaluation forward")
    p.add_argument("--out", default="runs/sensitivity.json", metavar="FILE.json", help="the JSON table")
    p.add_argument("--plot", default="runs/sensitivity.png", metavar="FILE.png", help="the heat map")
    p.add_argument("--json", action="store_true", help="print the JSON table on stdout instead of the summary")
    p.set_defaults(func=sensitivity_command)


def sensitivity_command(args) -> int:
    out = _writable("--out", args.out, ".json")
    plot = _writable("--plot", args.plot, ".png")
    from models.config import get_config
    from models.io.load import load_model
    from models.prepared import prepare
    from models.sensitivity import ROLES, check_policy, heatmap_figure, sensitivity
    from models.evaluate.perplexity import held_out
    from models.train.data import DataConfig

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    cfg0 = get_config(args.model) if args.gguf is None else None
    if cfg0 is not None:  # checked before the model is read
        if args.seq_len > cfg0.max_seq_len:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the context of {cfg0.name} ({cfg0.max_seq_len})")
        if args.sample > cfg0.n_layers * len(ROLES):
            raise ValueError(f"--sample {args.sample} exceeds the {cfg0.n_layers * len(ROLES)} entries of {cfg0.name}")
        check_policy(args.precision, cfg0)
    model = load_model(args.model, args.gguf, log=log)
    cfg, params, info = prepare(model, args.recipe, args.precision, log=log)
    windows, described = held_out(model.encoder, DataConfig(), args.seq_len, args.fisher_windows + args.windows)
    if len(windows) < args.fisher_windows + args.windows:
        raise ValueError(f"the held-out set has only {len(windows)} windows of {args.seq_len} tokens")
    result = sensitivity(params, cfg, args.precision, windows[: args.fisher_windows], windows[args.fisher_windows:],
                         args.sample, args.batch_size, log)
    flags = ("model", "gguf", "precision", "recipe", "fisher_windows", "windows", "seq_len", "sample", "batch_size")
    command = "np-jax sensitivity " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in flags
                                               if getattr(args, k) is not None)
    result = {"command": command, "model": cfg.name, "recipe": info["recipe"], "held_out": described, **result}
    result["seconds"]["total"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(heatmap_figure(result)).print_png(str(plot))
    if args.json:
        print(json.dumps(result))
        return 0
    top = sorted(result["entries"], key=lambda e: -e["estimate"])[:5]
    rho = "undefined (a constant side)" if result["spearman"] is None else f"{result['spearman']:.3f}"
    print(f"{cfg.name} at {result['policy']}: Spearman {rho} over {result['sampled']} measured "
          f"entries; most sensitive: " + ", ".join(f"layers.{e['layer']}.{e['role']} {e['estimate']:.4f}" for e in top))
    print(f"wrote {out} and {plot} in {result['seconds']['total']:.0f} s")
    return 0
