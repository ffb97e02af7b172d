"""Evaluation: held-out perplexity and top-1 agreement with float (the rows of `np-jax eval`) and
HumanEval pass@k.

- `perplexity`: `evaluate` (mean NLL, perplexity, top-1 agreement; its jitted step `nll_fn`), `held_out` (the held-out
  windows), `token_nll`.
- `humaneval`: `load_problems`, `sampling_settings`, `truncate`, `check` (runs a completion's
  tests in a child process), `pass_at_k`, `HumanEvalResult`, and its own `humaneval.evaluate`
  (the package's `evaluate` is the perplexity one).

Names are imported on first use.
"""

from models import _lazy

_EXPORTS = {
    **{m: f"models.evaluate.{m}" for m in ("humaneval", "perplexity")},
    **dict.fromkeys(("evaluate", "held_out", "nll_fn", "token_nll"), "models.evaluate.perplexity"),
    **dict.fromkeys(("HumanEvalResult", "STOP_SEQUENCES", "check", "load_problems", "pass_at_k", "sampling_settings",
                     "truncate"), "models.evaluate.humaneval"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy(__name__, _EXPORTS)
