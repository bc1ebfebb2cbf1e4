"""Evaluation tools for alibi-dinov2: positional probes, segmentation benchmarks and feature utilities."""
