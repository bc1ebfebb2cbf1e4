"""Accelerate runs: shared options (`arguments`), the accelerator and checkpoints (`runs`), and the distillation."""
