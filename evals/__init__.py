"""Our lm-eval task YAMLs, installed as the package data `compressor.evals` (pyproject maps this
top-level folder onto it). A task is data: one YAML here, no code."""
