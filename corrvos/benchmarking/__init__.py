"""Helpers of ``python -m corrvos.bench``: benchmark clips, per-stage timing hooks, memory and environment probes."""
