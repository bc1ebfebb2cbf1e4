"""Patch-feature extraction: grid shapes, prefix stripping, normalisation and errors on tiny models."""

import warnings

import numpy as np
import pytest
import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

from alibi_dinov2.features.extraction import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_to_patch_grid,
    extract_patch_features,
    extract_patch_features_batch,
    image_to_pixel_values,
    patch_size_of,
    prefix_token_count,
)
from alibi_dinov2.features.preprocessing import PatchGridCropWarning
from alibi_dinov2.io.images import ImageReadError, ImageTooSmallError, to_rgb01


TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56
)


def _tiny(model_class, config):
    torch.manual_seed(0)
    return model_class(config).eval()


def tiny_alibi_dinov3(**overrides):
    import configuration_alibi_dinov3 as configuration
    import modeling_alibi_dinov3 as modeling

    config = configuration.AlibiDinov3Config(**{**TINY, "patch_size": 16, "num_register_tokens": 4, **overrides})
    return _tiny(modeling.AlibiDinov3Model, config)


def tiny_alibi(**overrides):
    import configuration_alibi_dinov2 as configuration
    import modeling_alibi_dinov2 as modeling

    return _tiny(
        modeling.AlibiDinov2Model, configuration.AlibiDinov2Config(**{**TINY, "num_register_tokens": 4, **overrides})
    )


MODEL_FACTORIES = {
    "dinov2": (lambda: _tiny(Dinov2Model, Dinov2Config(**TINY)), 1),
    "dinov2_reg": (
        lambda: _tiny(Dinov2WithRegistersModel, Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)),
        5,
    ),
    "vit": (lambda: _tiny(lambda c: ViTModel(c, add_pooling_layer=False), ViTConfig(**TINY)), 1),
    "clip": (lambda: _tiny(CLIPVisionModel, CLIPVisionConfig(**TINY)), 1),
    "alibi": (tiny_alibi, 5),
}


@pytest.fixture(scope="module")
def image():
    """Non-square uint8 RGB image whose size is not a multiple of 14: 60 x 75 -> 4 x 5 grid."""
    return np.random.default_rng(0).integers(0, 256, size=(60, 75, 3), dtype=np.uint8)


def manual_pixel_values(image, patch=14, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Independent preprocessing: top-left crop to the patch grid, /255, per-channel normalisation."""
    h, w = image.shape[0] // patch * patch, image.shape[1] // patch * patch
    rgb = image[:h, :w].astype(np.float64) / 255.0
    normalised = (rgb - np.array(mean)) / np.array(std)
    return torch.tensor(normalised.transpose(2, 0, 1)[None], dtype=torch.float32)


def model_own_patch_tokens(model, pixel_values, prefix, grid):
    kwargs = {"interpolate_pos_encoding": True} if isinstance(model, (ViTModel, CLIPVisionModel)) else {}
    with torch.no_grad():
        tokens = model(pixel_values=pixel_values, **kwargs).last_hidden_state
        if isinstance(model, CLIPVisionModel):  # CLIP norms only its pooled output; patches are normed here
            tokens = model.post_layernorm(tokens)
    assert tokens.shape[1] == prefix + grid[0] * grid[1]
    return tokens[0, prefix:].reshape(*grid, -1).numpy()


@pytest.mark.parametrize("name", list(MODEL_FACTORIES))
def test_grid_shape_and_prefix_stripping_match_the_model_output(name, image):
    factory, expected_prefix = MODEL_FACTORIES[name]
    model = factory()
    assert prefix_token_count(model) == expected_prefix
    assert patch_size_of(model) == 14
    features = extract_patch_features(model, image)
    assert features.shape == (4, 5, 32) and features.dtype == np.float32
    expected = model_own_patch_tokens(model, manual_pixel_values(image), expected_prefix, (4, 5))
    np.testing.assert_allclose(features, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["dinov2", "dinov2_reg", "clip", "alibi"])
def test_all_layers_are_final_normed_block_outputs(name, image):
    model = MODEL_FACTORIES[name][0]()
    layers = extract_patch_features(model, image, layers="all")
    assert layers.shape == (3, 4, 5, 32)  # embeddings + 2 blocks
    np.testing.assert_allclose(layers[-1], extract_patch_features(model, image), atol=1e-5)
    prefix = prefix_token_count(model)
    with torch.no_grad():
        kwargs = {"interpolate_pos_encoding": True} if isinstance(model, CLIPVisionModel) else {}
        hidden = model(pixel_values=manual_pixel_values(image), output_hidden_states=True, **kwargs).hidden_states
        norm = model.post_layernorm if isinstance(model, CLIPVisionModel) else model.layernorm
        first_block = norm(hidden[1])[0, prefix:].reshape(4, 5, -1).numpy()
    np.testing.assert_allclose(layers[1], first_block, atol=1e-5)
    np.testing.assert_allclose(extract_patch_features(model, image, layers=1), first_block, atol=1e-5)
    assert extract_patch_features(model, image, layers=[0, -1]).shape == (2, 4, 5, 32)


def test_grayscale_is_replicated_and_dtypes_are_scaled(image):
    model = MODEL_FACTORIES["dinov2"][0]()
    gray = image[..., 0]
    from_gray = extract_patch_features(model, gray)
    np.testing.assert_array_equal(from_gray, extract_patch_features(model, np.repeat(gray[..., None], 3, axis=-1)))
    np.testing.assert_array_equal(from_gray, extract_patch_features(model, gray[..., None]))
    np.testing.assert_allclose(from_gray, extract_patch_features(model, gray.astype(np.float32) / 255), atol=1e-5)
    as_uint16 = gray.astype(np.uint16) * 257  # 255 * 257 = 65535: same [0, 1] values
    np.testing.assert_allclose(from_gray, extract_patch_features(model, as_uint16), atol=1e-5)


def test_image_processor_statistics_are_used(image):
    model = MODEL_FACTORIES["dinov2"][0]()
    stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    features = extract_patch_features(model, image, image_processor=stats)
    expected = model_own_patch_tokens(model, manual_pixel_values(image, mean=0.5, std=0.25), 1, (4, 5))
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert not np.allclose(features, extract_patch_features(model, image), atol=1e-3)
    processor = transformers.ViTImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.25] * 3)
    np.testing.assert_allclose(extract_patch_features(model, image, image_processor=processor), features, atol=1e-6)


def test_vit_mae_keeps_every_patch_in_order(image):
    config = ViTMAEConfig(**TINY, mask_ratio=0.75)
    model = _tiny(ViTMAEModel, config)
    features = extract_patch_features(model, image)
    assert features.shape == (4, 5, 32)
    np.testing.assert_array_equal(features, extract_patch_features(model, image))  # no random masking
    assert model.config.mask_ratio == 0.75  # restored
    config.mask_ratio = 0.0
    with torch.no_grad():
        tokens = model(
            pixel_values=manual_pixel_values(image), noise=torch.arange(20.0)[None], interpolate_pos_encoding=True
        ).last_hidden_state
    np.testing.assert_allclose(features, tokens[0, 1:].reshape(4, 5, -1).numpy(), atol=1e-5)


def test_task_wrapper_is_unwrapped_to_its_backbone(image):
    torch.manual_seed(0)
    classifier = Dinov2ForImageClassification(Dinov2Config(**TINY, num_labels=3)).eval()
    np.testing.assert_array_equal(
        extract_patch_features(classifier, image), extract_patch_features(classifier.dinov2, image)
    )


def test_extraction_switches_dropout_off(image):
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY, hidden_dropout_prob=0.5)).train()
    np.testing.assert_array_equal(extract_patch_features(model, image), extract_patch_features(model, image))


def test_batch_helper_matches_single_images(image):
    model = MODEL_FACTORIES["dinov2_reg"][0]()
    other = image[::-1].copy()
    batch = torch.cat([image_to_pixel_values(image, 14), image_to_pixel_values(other, 14)])
    grids = extract_patch_features_batch(model, batch).numpy()
    assert grids.shape == (2, 4, 5, 32)
    np.testing.assert_allclose(grids[1], extract_patch_features(model, other), atol=1e-5)
    assert extract_patch_features_batch(model, batch, layers="all").shape == (2, 3, 4, 5, 32)


def test_alibi_model_features_follow_whole_patch_rolls():
    model = tiny_alibi()
    picture = np.random.default_rng(1).random((56, 70)).astype(np.float32)
    rolled = np.roll(picture, (14, 28), axis=(0, 1))
    np.testing.assert_allclose(
        extract_patch_features(model, rolled),
        np.roll(extract_patch_features(model, picture), (1, 2), axis=(0, 1)),
        atol=1e-4,
    )


def test_clear_errors(image):
    model = MODEL_FACTORIES["dinov2"][0]()
    with pytest.raises(ImageTooSmallError, match="10 x 75 px is smaller than one 14 x 14 patch"):
        extract_patch_features(model, image[:10])
    with pytest.raises(ImageReadError, match="unsupported image layout"):
        extract_patch_features(model, np.zeros((28, 28, 5), dtype=np.uint8))
    # RGBA follows the one policy: alpha composited onto the ImageNet mean, the same as the composited RGB.
    rgba = np.concatenate([image[:28, :28], np.full((28, 28, 1), 128, dtype=image.dtype)], axis=-1)
    np.testing.assert_array_equal(extract_patch_features(model, rgba), extract_patch_features(model, to_rgb01(rgba)))
    with pytest.raises(ValueError, match="layers"):
        extract_patch_features(model, image, layers="middle")
    with pytest.raises(ValueError, match=r"Unsupported model.*dinov2.*vit"):
        extract_patch_features(torch.nn.Linear(3, 3), image)
    backbone = transformers.Dinov2Backbone(Dinov2Config(**TINY, out_features=["stage2"]))
    with pytest.raises(ValueError, match="Backbone"):
        extract_patch_features(backbone, image)
    resnet = transformers.ResNetModel(transformers.ResNetConfig(hidden_sizes=[8], depths=[1], embedding_size=8))
    with pytest.raises(ValueError, match="Unsupported model ResNetModel"):
        prefix_token_count(resnet)


@pytest.mark.parametrize(
    "model_class, config, expected_prefix",
    [
        (
            transformers.DINOv3ViTModel,
            transformers.DINOv3ViTConfig(**{**TINY, "patch_size": 16}, num_register_tokens=4),
            5,
        ),
        (lambda c: tiny_alibi_dinov3(num_register_tokens=2), None, 3),
        (transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**{**TINY, "patch_size": 16}), 0),
        (
            lambda c: transformers.DeiTModel(c, add_pooling_layer=False),
            transformers.DeiTConfig(**{**TINY, "patch_size": 16}),
            2,
        ),
    ],
    ids=["dinov3", "alibi_dinov3", "siglip", "deit"],
)
def test_other_families_strip_their_own_prefix(model_class, config, expected_prefix):
    model = _tiny(model_class, config)
    picture = np.random.default_rng(2).random((50, 70, 3)).astype(np.float32)  # 3 x 4 grid of 16 px
    assert prefix_token_count(model) == expected_prefix and patch_size_of(model) == 16
    features = extract_patch_features(model, picture)
    assert features.shape == (3, 4, 32)
    pixel_values = image_to_pixel_values(picture, 16)
    dinov3 = model.config.model_type in ("dinov3_vit", "alibi_dinov3")
    kwargs = {"interpolate_pos_encoding": True} if not dinov3 else {}
    with torch.no_grad():
        tokens = model(pixel_values=pixel_values, **kwargs).last_hidden_state
    assert tokens.shape[1] == expected_prefix + 12
    np.testing.assert_allclose(features, tokens[0, expected_prefix:].reshape(3, 4, -1).numpy(), atol=1e-5)


@pytest.mark.parametrize("model_type", ["dinov3_vit", "alibi_dinov3"])
def test_dinov3_layers_are_final_normed_block_outputs(model_type):
    config = dict(TINY, patch_size=16, num_register_tokens=4)
    if model_type == "dinov3_vit":
        model = _tiny(transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig(**config))
    else:
        model = tiny_alibi_dinov3()
    picture = np.random.default_rng(3).random((48, 80, 3)).astype(np.float32)  # 3 x 5 grid of 16 px
    layers = extract_patch_features(model, picture, layers="all")
    assert layers.shape == (3, 3, 5, 32)
    np.testing.assert_allclose(layers[-1], extract_patch_features(model, picture), atol=1e-5)
    with torch.no_grad():
        hidden = model(pixel_values=image_to_pixel_values(picture, 16), output_hidden_states=True).hidden_states
        first_block = model.norm(hidden[1])[0, 5:].reshape(3, 5, -1).numpy()
    np.testing.assert_allclose(layers[1], first_block, atol=1e-5)


def test_a_crop_to_the_patch_grid_is_said_once_per_size(monkeypatch):
    """300 x 451 px at patch 14: 294 x 448 px are kept (6 rows, 3 columns dropped); the warning names that, comes
    once however many images share the size (even under filters that show every warning), again for another size,
    and never for a multiple of the patch."""
    from alibi_dinov2.features import preprocessing

    monkeypatch.setattr(preprocessing, "ANNOUNCED_CROPS", set())
    model = tiny_alibi()
    images = {size: np.random.default_rng(0).random((*size, 3), dtype=np.float32)
              for size in [(300, 451), (70, 98), (60, 75)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what a library resetting the filters amounts to
        for _ in range(3):
            grid = extract_patch_features(model, images[300, 451])
            extract_patch_features(model, images[70, 98])
        extract_patch_features(model, images[60, 75])
    notes = [str(w.message) for w in caught if issubclass(w.category, PatchGridCropWarning)]
    assert grid.shape[:2] == (21, 32)
    assert len(notes) == 2, notes
    assert notes[0].startswith("images of 300 x 451 px are cropped to 294 x 448 px, the 14 px patch grid (21 x 32")
    assert "does not see the last 6 row(s) and 3 column(s)" in notes[0] and "308 x 462" in notes[0]
    assert notes[1].startswith("images of 60 x 75 px are cropped to 56 x 70 px")
    # The numpy crop used elsewhere is the same function, and a size already announced is not announced again.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert crop_to_patch_grid(images[300, 451], 14).shape == (294, 448, 3)
        assert crop_to_patch_grid(images[300, 451][:, :, 0], 16).shape == (288, 448)
    assert [str(w.message)[:40] for w in caught] == ["images of 300 x 451 px are cropped to 28"]
