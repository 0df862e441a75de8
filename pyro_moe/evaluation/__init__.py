"""Evaluation (a leaf: imports core only): metrics, temperature scaling, routing stability, plots,
reports of generated text."""
