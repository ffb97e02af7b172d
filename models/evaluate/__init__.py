"""Evaluation: held-out perplexity and agreement with float (`perplexity`), the quality report of
every precision and recipe (`quality`), HumanEval pass@k (`humaneval`)."""
