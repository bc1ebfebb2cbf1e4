"""Shared fixtures: tiny random configurations, offline Hub access, the repository root on sys.path."""

import os
import sys
from pathlib import Path

import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

# A ViT with DINOv2's layout, small enough for CPU tests: 2 layers, 2 heads of 16 dims, 4 x 4 trained grid.
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY_DINOV2)
