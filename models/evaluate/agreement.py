"""'Same code as float': how many greedy tokens a model writes, from a held-out code prompt,
before it departs from float's greedy continuation of the same prompt.

The measure for one prompt is the length of the common prefix of the two greedy continuations
of `tokens` tokens each (0 when the first token differs, `tokens` when all agree); a row's
figure is its mean over the prompts. Continuations run to `tokens` regardless of end-of-text
tokens, so every prompt counts on the same scale.

Prompts (`held_out_prompts`) are deterministic: one per `PROMPT_STRIDE` tokens of the held-out
stream (`models.train.data.held_out_windows`), its first `PROMPT_TOKENS` tokens cut back to just
after the last token that holds a newline, so that the continuation begins a line (the cut is
skipped if it would drop more than half of the prompt). Continuations come from
`models.generate.Generator` at the row's precision, the prompts batched as users.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from models import llama
from models.config import ModelConfig
from models.train.data import Corpus, held_out_windows

PROMPT_TOKENS = 64  # longest prompt
PROMPT_STRIDE = 256  # about two prompts per held-out file (each gives the stream at most 512 tokens)
BATCH = 32  # users per generation: decode steps cost about the same for 1 or 32 users on a CPU


def held_out_prompts(corpus: Corpus, n: int, length: int = PROMPT_TOKENS, stride: int = PROMPT_STRIDE
                     ) -> list[list[int]]:
    """The first `n` prompts of the held-out split (fewer if it runs out), each at most `length` tokens."""
    if not 1 <= length <= stride:
        raise ValueError(f"prompt length must be in [1, {stride}], got {length}")
    out = []
    for w in held_out_windows(corpus, stride, n):
        head = [int(t) for t in w[:length]]
        ends = [i + 1 for i, t in enumerate(head) if "\n" in corpus.encoder.decode([t])]
        cut = ends[-1] if ends and ends[-1] * 2 >= length else length
        out.append(head[:cut])
    return out


def greedy_continuations(params: llama.Params, cfg: ModelConfig, policy, prompts: Sequence[Sequence[int]],
                         tokens: int, batch_size: int = BATCH, progress: Callable[[int], None] | None = None
                         ) -> np.ndarray:
    """Each prompt's greedy continuation of exactly `tokens` tokens, int32 [P, tokens]. `progress(n)`
    is called after each generation step."""
    from models.generate import Generator, bucket_length

    if not prompts:
        raise ValueError("no prompts to continue")
    need = max(len(p) for p in prompts) + tokens - 1
    cache_len = min(bucket_length(need), cfg.max_seq_len)
    gen = Generator(None, cfg, policy, cache_len=cache_len, serving_params=llama.prepare_serving(params, cfg, policy))
    b = min(batch_size, len(prompts))
    out = []
    for i in range(0, len(prompts), b):
        chunk = [list(p) for p in prompts[i: i + b]]
        real = len(chunk)
        chunk += [chunk[0]] * (b - real)  # keep one compiled batch; padded users are dropped
        res = gen.generate(chunk, tokens, progress=progress)
        out.extend(res.tokens[:real])
    return np.asarray(out, np.int32)


def common_prefix_lengths(reference_PxT: np.ndarray, continuations_PxT: np.ndarray) -> np.ndarray:
    """Per prompt, the number of leading tokens of the continuation equal to the reference's, [P]."""
    ref, got = np.asarray(reference_PxT), np.asarray(continuations_PxT)
    if ref.shape != got.shape or ref.ndim != 2:
        raise ValueError(f"continuations of shape {got.shape} do not match the reference's {ref.shape}")
    return np.cumprod(ref == got, axis=1).sum(axis=1)
