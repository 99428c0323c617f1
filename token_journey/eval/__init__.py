"""Evaluation: `metrics` (every formula, once) and `evaluate` (the spliced forward passes of one layer)."""
