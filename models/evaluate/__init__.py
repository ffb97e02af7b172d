"""Evaluation: held-out perplexity and top-1 agreement with float (`perplexity`, the rows of
`np-jax eval`), HumanEval pass@k (`humaneval`)."""
