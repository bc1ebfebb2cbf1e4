"""Checkpoint conversion: read a DINOv2 / DINOv3 checkpoint, build an ALiBi (or NoPE) model of its family, write a
ready-to-publish folder."""
