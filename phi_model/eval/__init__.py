"""Evaluation: HumanEval in a sandbox of our own, pass@k, and an lm-evaluation-harness model."""
