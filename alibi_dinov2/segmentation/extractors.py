"""The feature sets of trainable segmentation as small extractor objects: one image in, an (H, W, C) float32 stack out.

    extractor = build_extractor("classical+vit", model=model, n_components=9)
    stack = extractor(image)                        # (H, W, 58 + 9): the classical stack, then the ViT channels
    extractor.channel_names                          # 67 names, in the order of the last axis
    extractor.cache_key                              # "classical(...)+vit(...)": every setting the stack depends on
    stack = extractor(image, cache=FeatureCache())   # each part's stack kept for the next call on the same pixels

* :class:`ClassicalFeatures`: the Weka-style filter bank (:mod:`alibi_dinov2.features.classical`).
* :class:`VitFeatures`: PCA of a model's patch features, upsampled to the pixels (:mod:`alibi_dinov2.features.vit`).
* :class:`ComposedFeatures`: several extractors' stacks side by side; its :attr:`~FeatureExtractor.parts` are
  cached and gathered apart, so a part shared by two compositions is computed once.

A cache entry is keyed by ``(part.cache_key, image_fingerprint(image))``: features are reused only for the same
pixels, settings and model weights. :data:`FEATURE_SETS` names the sets a :class:`TrainableSegmenter` takes.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from functools import cached_property
from typing import Optional, Sequence

import numpy as np

from alibi_dinov2.features.cache import image_fingerprint
from alibi_dinov2.features.classical import DEFAULT_SIGMAS, classical_features, feature_names
from alibi_dinov2.features.vit import DEFAULT_N_COMPONENTS, vit_feature_channels


FEATURE_SETS = ("classical", "vit", "classical+vit")
_FINGERPRINT_SAMPLES = 64  # values hashed per weight tensor (spread over it): cheap for any model size


def model_name_of(model) -> Optional[str]:
    """Hub id or local folder a transformers model was loaded from, if known (else its class name)."""
    if model is None:
        return None
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else type(model).__name__


def model_fingerprint(model) -> str:
    """A hash of a model's class, name and weights (the shapes and dtypes of all, a spread sample of the values).

    Two models with the same weights get the same fingerprint, in any process; models whose weights differ get
    different ones.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}:{model_name_of(model)}".encode())
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name, tensor in state.items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)][:_FINGERPRINT_SAMPLES]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def image_statistics_of(image_processor=None) -> dict[str, list[float]]:
    """``{"image_mean", "image_std"}`` (3 floats each) of a processor or dict; ImageNet's when ``None``."""
    from alibi_dinov2.features.preprocessing import image_statistics

    mean, std = image_statistics(image_processor)
    return {"image_mean": mean.tolist(), "image_std": std.tolist()}


class FeatureExtractor(ABC):
    """A per-pixel feature set: ``extractor(image)`` is an (H, W, C) float32 stack of ``channel_names``."""

    @property
    @abstractmethod
    def channel_names(self) -> list[str]:
        """Names of the C channels, in the order of the last axis."""

    @property
    @abstractmethod
    def cache_key(self) -> str:
        """A stable description of every setting (and model) the stack depends on."""

    @abstractmethod
    def compute(self, image: np.ndarray) -> np.ndarray:
        """The (H, W, C) float32 stack of an (H, W) or (H, W, 3|4) image, computed without a cache."""

    @property
    def parts(self) -> tuple[FeatureExtractor, ...]:
        """The extractors whose stacks are cached and gathered apart, in channel order (``(self,)`` but for a
        composition)."""
        return (self,)

    def cache_keys(self, image: np.ndarray) -> list[tuple[str, str]]:
        """The :class:`~alibi_dinov2.features.cache.FeatureCache` key of each part's stack of `image`."""
        fingerprint = image_fingerprint(image)
        return [(part.cache_key, fingerprint) for part in self.parts]

    def part_stacks(self, image: np.ndarray, cache=None) -> list[np.ndarray]:
        """Each part's (H, W, c) stack of `image`, from `cache` when it holds them (read-only then)."""
        if cache is None:
            return [part.compute(image) for part in self.parts]
        return [
            cache.get_or_compute(key, lambda part=part: part.compute(image))
            for part, key in zip(self.parts, self.cache_keys(image))
        ]

    def __call__(self, image: np.ndarray, cache=None) -> np.ndarray:
        """The (H, W, C) float32 stack of `image`; its parts come from `cache` (a ``FeatureCache``) when given."""
        stacks = self.part_stacks(image, cache)
        return stacks[0] if len(stacks) == 1 else np.concatenate(stacks, axis=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cache_key})"


class ClassicalFeatures(FeatureExtractor):
    """The Weka-style classical stack (:func:`~alibi_dinov2.features.classical.classical_features`).

    Args:
        sigmas: Gaussian scales (0 = the unblurred image); 58 channels for the default six.
        backend: ``"auto"``, ``"numpy"`` or ``"torch"``.
    """

    def __init__(self, sigmas: Sequence[float] = DEFAULT_SIGMAS, backend: str = "auto"):
        self.sigmas = tuple(float(sigma) for sigma in sigmas)
        self.backend = backend
        feature_names(self.sigmas)  # checks the sigmas now rather than at the first image

    @property
    def channel_names(self) -> list[str]:
        return feature_names(self.sigmas)

    @property
    def cache_key(self) -> str:
        return f"classical(sigmas={self.sigmas}, backend={self.backend!r})"

    def compute(self, image: np.ndarray) -> np.ndarray:
        return classical_features(image, sigmas=self.sigmas, backend=self.backend)


class VitFeatures(FeatureExtractor):
    """ViT channels: a PCA of the model's patch features, upsampled to the pixels
    (:func:`~alibi_dinov2.features.vit.vit_feature_channels`).

    Args:
        model: transformers image model.
        n_components: PCA dimensions, the channel count.
        image_processor: image statistics of the model's input (a processor, or a dict with ``image_mean`` and
            ``image_std``); ImageNet's when ``None``.
        max_side: tile side (pixels) on large images; ``None`` = the whole image in one pass.
    """

    def __init__(
        self,
        model,
        n_components: int = DEFAULT_N_COMPONENTS,
        image_processor=None,
        max_side: Optional[int] = None,
    ):
        if model is None:
            raise ValueError("ViT features need a model: pass model=<transformers model>")
        self.model = model
        self.n_components = int(n_components)
        self.image_processor = image_processor
        self.max_side = max_side

    @property
    def channel_names(self) -> list[str]:
        return [f"vit_pca{index + 1}" for index in range(self.n_components)]

    @property
    def image_statistics(self) -> dict[str, list[float]]:
        """``{"image_mean", "image_std"}`` the model's input is normalised with."""
        return image_statistics_of(self.image_processor)

    @cached_property
    def model_fingerprint(self) -> str:
        """:func:`model_fingerprint` of :attr:`model`, computed once."""
        return model_fingerprint(self.model)

    @property
    def cache_key(self) -> str:
        statistics = self.image_statistics
        return (
            f"vit(model={model_name_of(self.model)!r}, weights={self.model_fingerprint}, "
            f"n_components={self.n_components}, max_side={self.max_side}, "
            f"image_mean={tuple(statistics['image_mean'])}, image_std={tuple(statistics['image_std'])})"
        )

    def compute(self, image: np.ndarray) -> np.ndarray:
        return vit_feature_channels(
            self.model,
            image,
            n_components=self.n_components,
            image_processor=self.image_processor,
            max_side=self.max_side,
        )


class ComposedFeatures(FeatureExtractor):
    """Several extractors' stacks concatenated along the channels, in the order given (compositions flattened)."""

    def __init__(self, extractors: Sequence[FeatureExtractor]):
        self._parts = tuple(part for extractor in extractors for part in extractor.parts)
        if not self._parts:
            raise ValueError("ComposedFeatures needs at least one extractor")

    @property
    def parts(self) -> tuple[FeatureExtractor, ...]:
        return self._parts

    @property
    def channel_names(self) -> list[str]:
        return [name for part in self._parts for name in part.channel_names]

    @property
    def cache_key(self) -> str:
        return "+".join(part.cache_key for part in self._parts)

    def compute(self, image: np.ndarray) -> np.ndarray:
        return np.concatenate([part.compute(image) for part in self._parts], axis=-1)


def feature_set_parts(name: str) -> tuple[str, ...]:
    """The parts (``"classical"``, ``"vit"``) of a feature set of :data:`FEATURE_SETS`, in channel order.

    Raises:
        ValueError: `name` is no feature set; the message names the valid ones.
    """
    if name not in FEATURE_SETS:
        raise ValueError(f"Unknown feature set {name!r}; allowed values: {', '.join(FEATURE_SETS)}")
    return tuple(name.split("+"))


def uses_model(name: str) -> bool:
    """Whether the feature set `name` needs a ViT."""
    return "vit" in feature_set_parts(name)


def build_extractor(
    name: str,
    model=None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    feature_backend: str = "auto",
    n_components: int = DEFAULT_N_COMPONENTS,
    image_processor=None,
    max_side: Optional[int] = None,
) -> FeatureExtractor:
    """The extractor of the feature set `name` (see :data:`FEATURE_SETS`) with these settings.

    `sigmas` and `feature_backend` set the classical part (:class:`ClassicalFeatures`); `model`, `n_components`,
    `image_processor` and `max_side` the ViT part (:class:`VitFeatures`).
    """
    builders = {
        "classical": lambda: ClassicalFeatures(sigmas, feature_backend),
        "vit": lambda: VitFeatures(model, n_components, image_processor, max_side),
    }
    parts = [builders[part]() for part in feature_set_parts(name)]
    return parts[0] if len(parts) == 1 else ComposedFeatures(parts)


__all__ = [
    "FEATURE_SETS",
    "ClassicalFeatures",
    "ComposedFeatures",
    "FeatureExtractor",
    "VitFeatures",
    "build_extractor",
    "feature_set_parts",
    "image_statistics_of",
    "model_fingerprint",
    "model_name_of",
    "uses_model",
]
