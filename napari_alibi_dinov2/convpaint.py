"""ALiBi-DINOv2 and ALiBi-DINOv3 (any model folder or Hub id :func:`alibi_dinov2.hub.models.load_model` loads) as
feature extractors of Convpaint (``napari-convpaint``, tested with 1.2.0), so that Convpaint users pick them in
Convpaint itself.

Convpaint lists the extractors of the scripts in its own ``feature_extractors`` folder and has no plugin hook for
others; its class-level registry, ``ConvpaintModel.FE_MODELS_TYPES_DICT`` (name -> extractor class, which its widget
lists and ``ConvpaintModel(fe_name=...)`` builds), is the route it supports for an outside extractor:

    from napari_alibi_dinov2.convpaint import register_models
    register_models({"alibi-dinov2-small": "out/alibi-dinov2-small-coco"})
    model = ConvpaintModel(fe_name="alibi-dinov2-small")      # or pick it in Convpaint's widget opened afterwards

The plugin's "Convpaint with ALiBi models" widget does this for the models of the environment variable
:data:`MODELS_VARIABLE` (``NAME=FOLDER_OR_HUB_ID`` entries separated by the path separator) and opens Convpaint's own
widget. Like Convpaint's DINOv2 and DINOv3 extractors, the features are the final-normed patch tokens of RGB input
(gray images replicated), normalised by Convpaint with the ImageNet statistics that DINOv2 and DINOv3 use, and
upsampled by Convpaint to the pixels.
"""

from __future__ import annotations

import os
from typing import Mapping

import napari
import numpy as np
import torch
from napari_convpaint.convpaint_model import ConvpaintModel
from napari_convpaint.convpaint_widget import ConvpaintWidget
from napari_convpaint.feature_extractor import FeatureExtractor
from napari_convpaint.param import Param

from alibi_dinov2.features.extraction import extract_patch_features_batch, patch_size_of
from alibi_dinov2.names import short_names


MODELS: dict[str, str] = {}  # Convpaint name -> folder or Hub id, filled by register_models
MODELS_VARIABLE = "ALIBI_DINOV2_CONVPAINT_MODELS"


class AlibiDinoFeatures(FeatureExtractor):
    """A Convpaint feature extractor for a model registered under `model_name` (see :func:`register_models`), or for
    `model`, a transformers model given directly."""

    def __init__(self, model_name: str, model=None, **kwargs):
        super().__init__(model_name=model_name, model=model)
        self.patch_size = patch_size_of(self.model)
        self.padding = 0
        self.num_input_channels = [3]
        self.has_global_context = True  # attention spans the whole image: no tiling
        self.norm_mode = "imagenet"
        self.rgb_input = True
        self.proposed_scalings = [[1]]
        self.device = next(self.model.parameters()).device

    @staticmethod
    def create_model(model_name: str):
        from alibi_dinov2.hub.models import load_model

        if model_name not in MODELS:
            raise ValueError(f"No model registered as {model_name!r}: call register_models({{{model_name!r}: "
                             "FOLDER_OR_HUB_ID}) first")
        return load_model(MODELS[model_name])[0]

    def get_description(self) -> str:
        source = MODELS.get(self.model_name, type(self.model).__name__)
        return (f"{source}: patch features of a ViT without positional bias (ALiBi-DINOv2 / ALiBi-DINOv3), "
                f"{self.patch_size} px patches. Good for homogeneous micrographs.")

    def get_default_params(self, param=None):
        param = super().get_default_params(param=param)
        param.fe_layers = None
        param.fe_scalings = [1]
        param.fe_order = 0
        param.tile_image = False
        param.tile_annotations = False
        return param

    def get_enforced_params(self, param=None):
        param = super().get_enforced_params(param=param)
        param.fe_scalings = [1]
        return param

    def extract_features_from_stack(self, image: np.ndarray, device=torch.device("cpu"), **kwargs) -> list[np.ndarray]:
        """[3, Z, H, W] normalised planes (H, W multiples of the patch size) -> [(C, Z, H / p, W / p)]."""
        self.move_model_to_device(device)
        planes = []
        for plane in np.moveaxis(np.asarray(image, dtype=np.float32), 1, 0):
            grid = extract_patch_features_batch(self.model, torch.from_numpy(np.ascontiguousarray(plane))[None])
            planes.append(grid[0].float().cpu().numpy())
        return [np.moveaxis(np.stack(planes), -1, 0)]


def register_models(models: Mapping[str, str]) -> list[str]:
    """Offer each model (Convpaint name -> folder or Hub id) in Convpaint: its widget lists it, ``ConvpaintModel(
    fe_name=name)`` and ``ConvpaintModel(alias=name)`` build it. Returns the names Convpaint now knows."""
    ConvpaintModel.get_fe_models_types()  # Convpaint's own extractors first (it fills an empty registry only)
    for name, source in models.items():
        MODELS[name] = str(source)
        ConvpaintModel.FE_MODELS_TYPES_DICT[name] = AlibiDinoFeatures
        ConvpaintModel.STD_MODELS[name] = Param(fe_name=name)
    return sorted(ConvpaintModel.get_fe_models_types())


def models_from_environment(value: str | None = None) -> dict[str, str]:
    """``NAME=SOURCE`` entries of :data:`MODELS_VARIABLE` (or `value`), separated by the path separator; entries
    without a name are named as every command names its models (:func:`alibi_dinov2.names.short_names`)."""
    value = os.environ.get(MODELS_VARIABLE, "") if value is None else value
    entries = [entry.rpartition("=") for entry in filter(None, (part.strip() for part in value.split(os.pathsep)))]
    entries = [(name.strip(), source.strip()) for name, _, source in entries]
    defaults = iter(short_names([source for name, source in entries if not name]))
    return {name or next(defaults): source for name, source in entries}


class ConvpaintWithAlibiModels(ConvpaintWidget):
    """Convpaint's own widget, with the models of :data:`MODELS_VARIABLE` among its feature extractors."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent=None):
        from napari.utils.notifications import show_info

        models = models_from_environment()
        register_models(models)
        if not models:
            show_info(f"No ALiBi models listed: set {MODELS_VARIABLE}=NAME=FOLDER_OR_HUB_ID before starting napari, "
                      "or call napari_alibi_dinov2.convpaint.register_models in napari's console")
        super().__init__(napari_viewer, parent=parent)
