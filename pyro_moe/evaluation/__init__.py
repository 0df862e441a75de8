"""Evaluation (a leaf: imports core only): metrics, temperature scaling, routing stability, plots."""
