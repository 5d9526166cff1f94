"""Fusion ablations: sweep specs, variant groups sharing one pass over the cache, the probe and LM budgets, and the
results report with its plots. Described in docs/ablations.md."""
