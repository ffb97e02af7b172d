"""Evaluation: held-out perplexity, top-1 agreement and KL with float, greedy tokens identical to
float's (the rows of `np-jax eval`) and HumanEval pass@k.

- `perplexity`: `evaluate` (mean NLL, perplexity, top-1 agreement, KL(float || model); its jitted step `nll_fn`),
  `held_out` (the held-out windows), `token_nll`, `token_kl`, `rounded_weights` (the float model's
  weights rounded to bf16/fp16: the measures' floor).
- `agreement`: `held_out_prompts`, `greedy_continuations`, `common_prefix_lengths` (the "same code as
  float" measure), `PROMPT_TOKENS`.
- `humaneval`: `load_problems`, `sampling_settings`, `truncate`, `check` (runs a completion's
  tests in a child process), `pass_at_k`, `HumanEvalResult`, and its own `humaneval.evaluate`
  (the package's `evaluate` is the perplexity one).

Names are imported on first use.
"""

from models import _lazy

_EXPORTS = {
    **{m: f"models.evaluate.{m}" for m in ("agreement", "humaneval", "perplexity")},
    **dict.fromkeys(("evaluate", "held_out", "nll_fn", "rounded_weights", "token_kl", "token_nll"),
                    "models.evaluate.perplexity"),
    **dict.fromkeys(("BATCH", "PROMPT_TOKENS", "common_prefix_lengths", "greedy_continuations", "held_out_prompts"),
                    "models.evaluate.agreement"),
    **dict.fromkeys(("HumanEvalResult", "STOP_SEQUENCES", "check", "load_problems", "pass_at_k", "sampling_settings",
                     "truncate"), "models.evaluate.humaneval"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy(__name__, _EXPORTS)
