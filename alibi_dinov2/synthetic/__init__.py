"""Synthetic data: homogeneous microstructures and hand-wired DINOv2 / DINOv3 teachers."""
