"""Measurements of alibi-dinov2 models: positional probes (one protocol), the report, metrics, the transformation
check, the scribble benchmark, linear segmentation probes and publishing with evaluation."""
