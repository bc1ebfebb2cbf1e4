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


# A ViT with DINOv3's layout: 2 layers, 2 heads of 16 dims, 16 px patches, 4 x 4 trained grid.
TINY_DINOV3 = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16, image_size=64
)
TINY_CONFIGS = {"alibi_dinov2": TINY_DINOV2, "alibi_dinov3": TINY_DINOV3}
ALIBI_MODEL_TYPES = tuple(TINY_CONFIGS)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY_DINOV2)


def tiny_alibi_model(model_type: str = "alibi_dinov2", seed: int = 0, model_options=None, **config_options):
    """A tiny random ALiBi model of `model_type` in eval mode: its configuration takes `config_options`, its
    constructor `model_options` (the attention's memory options)."""
    from transformers import AutoConfig, AutoModel

    import modeling_alibi_dinov2  # noqa: F401  (registers both model types with the Auto classes)
    import modeling_alibi_dinov3  # noqa: F401

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **config_options})
    return AutoModel.from_config(config, **(model_options or {})).eval()


def bias_module(model):
    """The ALiBi bias module of either model type (`encoder.alibi` in ALiBi-DINOv2, `model.alibi` in ALiBi-DINOv3)."""
    encoder = model.encoder if model.config.model_type == "alibi_dinov2" else model.model
    return encoder.alibi


def assert_same_outputs(actual, expected, num_hidden_states: int, atol: float = 1e-5) -> None:
    """Two models' outputs (run with `output_hidden_states=True`) agree: last hidden state, pooler output and every
    hidden state, within `atol`."""
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=atol, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=atol, rtol=0)
    assert len(actual.hidden_states) == len(expected.hidden_states) == num_hidden_states
    for ours, theirs in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


# Run first in an isolated child: the project's model modules become unimportable, whatever sys.path holds.
PROJECT_MODULES = (
    "alibi_attention",
    "configuration_alibi_dinov2",
    "modeling_alibi_dinov2",
    "configuration_alibi_dinov3",
    "modeling_alibi_dinov3",
)
_BLOCK_PROJECT = f"import sys; sys.modules.update(dict.fromkeys({PROJECT_MODULES!r}))\n"


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


# The napari plugin's tests (tests/napari_alibi_dinov2/) run without a display: pytest-xvfb starts an Xvfb server (and
# sets DISPLAY) where the `xvfb` package is installed, and napari's canvas gets its OpenGL context there (Mesa
# llvmpipe). Qt's offscreen platform has no OpenGL under Qt 6, so napari's viewer cannot run on it; it is set only so
# that Qt, finding no display, fails those tests instead of aborting the whole run.
@pytest.hookimpl(trylast=True)  # after pytest-xvfb's pytest_configure, which starts the server
def pytest_configure(config):
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


NAPARI_MANIFEST = REPO_ROOT / "napari_alibi_dinov2" / "napari.yaml"


@pytest.fixture
def napari_plugin(npe2pm):
    """npe2's test plugin manager with the project's napari manifest registered (installed or not)."""
    from npe2 import PluginManifest

    if not os.environ.get("DISPLAY"):
        pytest.fail("napari's canvas needs OpenGL and an X server: install the xvfb package (apt-get install xvfb), "
                    "which pytest-xvfb starts")

    manifest = PluginManifest.from_file(NAPARI_MANIFEST)
    npe2pm.register(manifest)
    return manifest


@pytest.fixture
def viewer(make_napari_viewer, napari_plugin):
    """A napari viewer (not shown) that knows the project's plugin."""
    return make_napari_viewer()
