"""Offline work beside the run-time library: training-data generation (dataset), anatomy augmentation (augment),
network training (training) and the per-case summaries training and the benchmarks share (evaluation). These
modules may use the run-time layers; no run-time module imports them (Testing/test_layers.py checks)."""
