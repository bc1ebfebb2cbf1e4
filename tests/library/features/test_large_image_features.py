"""Whole-image features of large images through the memory-bounded chunked attention path."""

import numpy as np
import pytest
import tifffile
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel

from alibi_attention import ALIBI_RUNTIME_DEFAULTS, alibi_query_block_size
from alibi_dinov2.features.extraction import image_to_pixel_values
from alibi_dinov2.features.large_images import extract_feature_map, layer_progress
from alibi_dinov2.io.images import ImageTooSmallError
from configuration_alibi_dinov2 import AlibiDinov2Config
from conftest import ALIBI_MODEL_TYPES, TINY_DINOV3, tiny_alibi_model
from modeling_alibi_dinov2 import AlibiDinov2Model


@pytest.fixture
def alibi_model(tiny_kwargs):
    torch.manual_seed(0)
    return AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs)).eval()


@pytest.fixture
def sixteen_bit_tiff(tmp_path):
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 65535, size=(2, 150, 213), dtype=np.uint16)  # not multiples of the patch size
    path = tmp_path / "micrograph.tif"
    tifffile.imwrite(path, pages)
    return path, pages


@pytest.mark.parametrize("model_type", ALIBI_MODEL_TYPES)
def test_features_of_a_16_bit_tiff_equal_the_dense_forward(model_type, sixteen_bit_tiff, monkeypatch):
    alibi_model = tiny_alibi_model(model_type)
    patch = alibi_model.config.patch_size
    path, pages = sixteen_bit_tiff
    pixel_values = image_to_pixel_values(pages[1], patch)
    with torch.no_grad():
        expected = alibi_model.get_patch_features(pixel_values)[0].numpy()
    query_counts = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, *args, **kwargs):
        query_counts.append(query.shape[-2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    features = extract_feature_map(alibi_model, path, page=1, attention_memory_mb=0.01, progress=False)
    assert features.shape == (32, 150 // patch, 213 // patch) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=1e-4)
    # Streamed in blocks that the memory bound sets (the model's own 1024-query ceiling does not apply).
    tokens = 5 + (150 // patch) * (213 // patch)
    block = alibi_query_block_size(tokens, 2, 1 << 30, 0.01)
    assert 1 < block < tokens and max(query_counts) == block and len(query_counts) == 2 * -(-tokens // block)
    # The model is left as it was, its config never touched.
    assert alibi_model.config._attn_implementation == "sdpa" and alibi_model.alibi_query_chunk_size == 1024
    assert (
        alibi_model.alibi_chunk_memory_mb == ALIBI_RUNTIME_DEFAULTS["alibi_chunk_memory_mb"]
        and not hasattr(alibi_model.config, "alibi_chunk_memory_mb")
    )
    assert not np.allclose(features, extract_feature_map(alibi_model, pages[0], progress=False), atol=1e-3)


def test_memory_bound_sets_the_query_block(alibi_model):
    tokens, heads = 21321, 6  # a 2044 x 2044 px image through ViT-S/14 with 4 registers
    small, large = alibi_query_block_size(tokens, heads, 4096, 64), alibi_query_block_size(tokens, heads, 4096, 1024)
    assert 1 <= small < large
    assert large * tokens * (heads + 4) * 4 <= 1024 * 2**20
    assert alibi_query_block_size(tokens, heads, 100, 1024) == 100  # the configured block is a ceiling
    assert alibi_query_block_size(100, heads, 4096, 10**6) == 100
    with pytest.raises(ValueError, match="must be positive"):
        extract_feature_map(alibi_model, np.zeros((28, 28)), attention_memory_mb=0, progress=False)
    with pytest.raises(ValueError, match="alibi_chunk_memory_mb"):
        AlibiDinov2Model(alibi_model.config, alibi_chunk_memory_mb=0)


def test_models_without_alibi_run_on_their_own_path(tiny_kwargs):
    torch.manual_seed(0)
    stock = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tiny_kwargs, num_register_tokens=4)).eval()
    image = np.random.default_rng(1).random((70, 84)).astype(np.float32)
    features = extract_feature_map(stock, image, progress=False)
    with torch.no_grad():
        tokens = stock(image_to_pixel_values(image, 14), interpolate_pos_encoding=True).last_hidden_state
    expected = tokens[0, 5:].reshape(5, 6, 32).permute(2, 0, 1).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)


@pytest.mark.parametrize(
    "make_model",
    [lambda: tiny_alibi_model("alibi_dinov2"), lambda: tiny_alibi_model("alibi_dinov3"),
     lambda: DINOv3ViTModel(DINOv3ViTConfig(**{**TINY_DINOV3, "num_hidden_layers": 3}))],
    ids=["alibi_dinov2", "alibi_dinov3", "dinov3_vit"],
)
def test_the_progress_bar_advances_once_per_layer(make_model):
    model = make_model().eval()
    with layer_progress(model, "features") as bar, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert bar.total == bar.n == model.config.num_hidden_layers


def test_an_image_smaller_than_a_patch_is_refused(alibi_model):
    with pytest.raises(ImageTooSmallError, match="10 x 300 px is smaller than one 14 x 14 patch"):
        extract_feature_map(alibi_model, np.zeros((10, 300), dtype=np.uint8), progress=False)
