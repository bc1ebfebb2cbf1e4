"""Shared fixtures: tiny random configurations, offline Hub access, the repository root on sys.path."""

import os
import subprocess
import sys
import textwrap
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


# Run first in an isolated child: the project's model modules become unimportable, whatever sys.path holds.
_BLOCK_PROJECT = (
    "import sys; sys.modules['modeling_alibi_dinov2'] = None; sys.modules['configuration_alibi_dinov2'] = None\n"
)


@pytest.fixture
def run_isolated(tmp_path):
    """Run Python code in a fresh process where this project cannot be imported; returns the finished process."""

    def run(code: str) -> subprocess.CompletedProcess:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
        result = subprocess.run(
            [sys.executable, "-c", _BLOCK_PROJECT + textwrap.dedent(code)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run
