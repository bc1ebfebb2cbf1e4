"""ALiBi models as Convpaint feature extractors, through Convpaint's own API (napari-convpaint 1.2.0): registered
names that Convpaint builds and lists, features of the image's size equal to the project's patch features, and a
training and segmentation by Convpaint."""

import os

import numpy as np
import pytest
import torch


pytest.importorskip("napari_convpaint", reason="CI installs napari-convpaint (.ci/run, without timm and torchvision)")

from napari_convpaint.convpaint_model import ConvpaintModel  # noqa: E402
from napari_convpaint.convpaint_widget import ConvpaintWidget  # noqa: E402

from alibi_dinov2.features.extraction import extract_patch_features_batch  # noqa: E402
from alibi_dinov2.synthetic.microstructures import generate_microstructure  # noqa: E402
from napari_alibi_dinov2.convpaint import (  # noqa: E402
    MODELS,
    AlibiDinoFeatures,
    models_from_environment,
    register_models,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from conftest import tiny_alibi_model

    root = tmp_path_factory.mktemp("convpaint-models")
    for model_type in ("alibi_dinov2", "alibi_dinov3"):
        tiny_alibi_model(model_type).save_pretrained(root / model_type)
    return {model_type: root / model_type for model_type in ("alibi_dinov2", "alibi_dinov3")}


@pytest.mark.parametrize("model_type, patch", [("alibi_dinov2", 14), ("alibi_dinov3", 16)])
def test_convpaint_builds_the_registered_model_and_its_features_have_the_image_size(folders, model_type, patch):
    names = register_models({f"test-{model_type}": folders[model_type]})
    assert f"test-{model_type}" in names and f"test-{model_type}" in ConvpaintModel.get_fe_models_types()
    model = ConvpaintModel(fe_name=f"test-{model_type}", unpatch_order=0)  # patch features upsampled by nearest
    assert isinstance(model.fe_model, AlibiDinoFeatures) and model.fe_model.get_patch_size() == patch
    odd, _ = generate_microstructure((5 * patch + 3, 6 * patch + 5), seed=0)  # padded by Convpaint, then cropped
    assert model.get_feature_image(odd).shape == (32, *odd.shape)
    image, _ = generate_microstructure((5 * patch, 6 * patch), seed=0)
    features = model.get_feature_image(image, skip_norm=True)
    assert features.shape == (32, *image.shape)
    # at each patch's pixels, the project's own patch features of the same (gray, replicated) input
    pixel_values = torch.from_numpy(np.repeat(image[None, None], 3, axis=1))
    grid = extract_patch_features_batch(model.fe_model.model, pixel_values)[0].numpy()
    for row, column in [(0, 0), (patch - 1, patch - 1), (patch // 2, 3)]:
        np.testing.assert_allclose(np.moveaxis(features[:, row::patch, column::patch], 0, -1), grid, atol=1e-5)
    assert ConvpaintModel(alias=f"test-{model_type}").fe_model.model_name == f"test-{model_type}"


def test_convpaint_trains_and_segments_with_an_alibi_extractor(folders):
    register_models({"test-alibi": folders["alibi_dinov2"]})
    model = ConvpaintModel(fe_name="test-alibi", clf_iterations=30)
    image, truth = generate_microstructure((98, 112), seed=1, grain_size=20)
    scribbles = np.zeros_like(truth)
    scribbles[::7, ::7] = truth[::7, ::7]
    model.train(image, scribbles)
    mask = model.segment(image)
    assert mask.shape == image.shape and set(np.unique(mask)) == {1, 2}
    assert np.mean(mask[scribbles > 0] == scribbles[scribbles > 0]) > 0.6  # better than chance on its own scribbles


def test_unregistered_names_and_the_environment_variable():
    with pytest.raises(ValueError, match="No model registered as 'nowhere': call register_models"):
        AlibiDinoFeatures.create_model("nowhere")
    value = os.pathsep.join(["small=out/alibi-dinov2-small", " me/alibi-dinov3 ", "", "coco = out/coco/"])
    assert models_from_environment(value) == {
        "small": "out/alibi-dinov2-small", "alibi-dinov3": "me/alibi-dinov3", "coco": "out/coco/"
    }
    assert models_from_environment("") == {} and isinstance(MODELS, dict)
    # unnamed models of the same folder name keep apart, as every command names them
    assert models_from_environment(os.pathsep.join(["a/model", "b/model"])) == {"a/model": "a/model",
                                                                                "b/model": "b/model"}


def test_the_plugin_opens_convpaint_with_the_models_of_the_environment(viewer, folders, monkeypatch):
    monkeypatch.setenv("ALIBI_DINOV2_CONVPAINT_MODELS", f"alibi-from-env={folders['alibi_dinov3']}")
    _, widget = viewer.window.add_plugin_dock_widget("alibi-dinov2", "Convpaint with ALiBi models")
    # Convpaint sets its widget up when shown, with its default VGG16 extractor (torchvision, not installed here):
    # this ALiBi model stands in as the default
    defaults = ConvpaintModel.get_default_params()
    defaults.set(fe_name="alibi-from-env", fe_layers=None)
    monkeypatch.setattr(ConvpaintModel, "get_default_params", staticmethod(defaults.copy))
    widget.ensure_init()
    listed = [widget.qcombo_fe_type.itemText(index) for index in range(widget.qcombo_fe_type.count())]
    assert isinstance(widget, ConvpaintWidget) and "alibi-from-env" in listed
    assert isinstance(widget.cp_model.fe_model, AlibiDinoFeatures)
    assert MODELS["alibi-from-env"] == str(folders["alibi_dinov3"])
