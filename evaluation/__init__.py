"""Measurements of alibi-dinov2 models: positional probes, the report, metrics, the transformation
check, the scribble benchmark, linear segmentation probes and publishing with evaluation."""
