"""Experiment tooling that is not part of the corrvos product (not installed with it; run from the repository
root): ``python -m experiments.recipe`` (the shipped-checkpoint training recipe), ``python -m experiments.speed``
(training-step cost of the correspondence losses), ``python -m experiments.bench_data`` (data-pipeline cost)."""
