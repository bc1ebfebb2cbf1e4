"""Trainable (interactive, scribble-driven) segmentation: a per-pixel classifier on feature stacks.

Pixels a user labels (scribbles) train a classifier on per-pixel features; the classifier then labels
every pixel. Features are the Weka-style classical stack, the ViT channels (PCA of a transformers
model's patch features), or both: the extractor objects of :mod:`alibi_dinov2.segmentation.extractors`, which
:meth:`TrainableSegmenter.feature_extractor` builds from the ``features`` name. Label convention everywhere:
0 = unlabelled, 1..K = classes.

Example::

    segmenter = TrainableSegmenter(features="classical", classifier="xgboost")
    segmenter.fit(image, scribbles)          # scribbles: int (H, W), 0 where unlabelled
    mask = segmenter.predict(image)           # int32 (H, W), values = the scribbled classes
    segmenter.save("segmenter.zip")     # JSON settings + XGBoost JSON; safe to load
    same = TrainableSegmenter.load("segmenter.zip")

With ``feature_cache=FeatureCache()`` (:mod:`alibi_dinov2.features.cache`) an image's feature stacks are computed once
and reused by later fits and predictions on the same pixels (more scribbles on the same image, several segmenters
sharing the classical stack). The extractor's parts (the classical and the ViT stack) are kept apart and never
concatenated for the whole image: training gathers the labelled pixels of each, prediction joins them a block of
pixels at a time.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from alibi_dinov2.errors import SourceNotFoundError
from alibi_dinov2.features.classical import DEFAULT_SIGMAS, prepare_image
from alibi_dinov2.io.images import read_image, read_labels
from alibi_dinov2.segmentation.extractors import (
    FeatureExtractor,
    build_extractor,
    image_statistics_of,
    model_name_of,
    uses_model,
)


CLASSIFIERS = ("xgboost", "random_forest")
# Dense-CRF parameters of the reference (unary = -log p).
CRF_PARAMETERS = {
    "gaussian_sxy": 1,
    "gaussian_compat": 10,
    "bilateral_sxy": 30,
    "bilateral_srgb": 13,
    "bilateral_compat": 10,
    "n_iterations": 10,
}
_PREDICT_CHUNK_ROWS = 1 << 18  # bounds the classifier's working memory on large images
_NO_LABELS_MESSAGE = "No labelled pixels: label at least one pixel of two classes (values 1..K; 0 = unlabelled)"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _as_image_list(images) -> tuple[list[np.ndarray], bool]:
    """A list/tuple is many images; a single array is one image. Returns (list, was_single)."""
    if isinstance(images, (list, tuple)):
        return [np.asarray(image) for image in images], False
    return [np.asarray(images)], True


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


def _training_inputs(images, labels) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[str, str]]]:
    """`fit`'s images and label images as arrays, and the (label, image) names its messages use: a file is read (the
    image by the project's reader, the labels by `read_labels`) and named by its path, an array by its position."""
    single = not isinstance(images, (list, tuple))
    image_items, label_items = ([images], [labels]) if single else (list(images), list(labels))
    if len(label_items) != len(image_items):
        raise ValueError(f"Got {len(image_items)} image(s) but {len(label_items)} label image(s)")
    arrays, label_arrays, names = [], [], []
    for index, (image, label) in enumerate(zip(image_items, label_items)):
        image_name = str(image) if _is_path(image) else f"image {index}"
        label_name = str(label) if _is_path(label) else f"label image {index}"
        if _is_path(label) and not os.path.exists(label):
            raise SourceNotFoundError(f"label file not found: {label} (the labels of {image_name})")
        arrays.append(read_image(image) if _is_path(image) else np.asarray(image))
        label_arrays.append(read_labels(label) if _is_path(label) else np.asarray(label))
        names.append((label_name, image_name))
    return arrays, label_arrays, names


def _check_labels(labels: np.ndarray, image_shape: tuple[int, ...], names: tuple[str, str]) -> np.ndarray:
    """`labels` as int64 after checking them against their image; `names`: (label, image) as messages name them."""
    label_name, image_name = names
    labels = np.asarray(labels)
    if labels.shape != tuple(image_shape[:2]):
        raise ValueError(
            f"{label_name} has shape {labels.shape} but {image_name} is {tuple(image_shape[:2])} "
            "(labels must be (H, W) with 0 = unlabelled, 1..K = classes)"
        )
    if labels.dtype == bool:
        labels = labels.astype(np.int32)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"{label_name} (labels of {image_name}) holds non-integer values")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{label_name} (labels of {image_name}) holds negative values; use 0 for unlabelled, 1..K "
                         "for classes")
    return labels.astype(np.int64)


def image_channels(image: np.ndarray) -> int:
    """Channels of an (H, W) (1) or (H, W, C) (C) image."""
    return 1 if image.ndim == 2 else int(image.shape[2])


def _common_channels(images: Sequence[np.ndarray]) -> int:
    counts = sorted({image_channels(image) for image in images})
    if len(counts) > 1:
        raise ValueError(f"Training images have different channel counts {counts}; use images of one kind")
    return counts[0]


def _import_densecrf():
    try:
        import pydensecrf.densecrf as densecrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as error:
        raise ImportError(
            "crf=True needs the optional 'pydensecrf' package. Install it with "
            "`pip install pydensecrf2` (prebuilt wheels) or "
            "`pip install git+https://github.com/lucasb-eyer/pydensecrf.git`, or use crf=False."
        ) from error
    return densecrf, unary_from_softmax


def dense_crf(image: np.ndarray, probabilities: np.ndarray, parameters: Optional[dict] = None) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF (pydensecrf).

    Args:
        image: (H, W) or (H, W, 3|4) image; its [0, 1] grayscale drives the bilateral term.
        probabilities: (H, W, K) class probabilities.
        parameters: overrides of :data:`CRF_PARAMETERS`.

    Returns:
        float32 (H, W, K) refined marginals.
    """
    densecrf, unary_from_softmax = _import_densecrf()
    params = {**CRF_PARAMETERS, **(parameters or {})}
    height, width, n_classes = probabilities.shape
    gray = (prepare_image(image) * 255).round().astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    softmax = np.ascontiguousarray(np.moveaxis(probabilities, -1, 0), dtype=np.float32)
    crf = densecrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(softmax)))
    crf.addPairwiseGaussian(sxy=params["gaussian_sxy"], compat=params["gaussian_compat"])
    crf.addPairwiseBilateral(
        sxy=params["bilateral_sxy"], srgb=params["bilateral_srgb"], rgbim=rgb, compat=params["bilateral_compat"]
    )
    marginals = np.array(crf.inference(params["n_iterations"]), dtype=np.float32)
    return np.moveaxis(marginals.reshape(n_classes, height, width), 0, -1)


# --------------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------------
class TrainableSegmenter(BaseEstimator):
    """Per-pixel classifier trained on scribbles.

    Args:
        features: ``"classical"`` (Weka-style stack, 58 channels by default), ``"vit"`` (PCA of the
            model's patch features) or ``"classical+vit"``.
        classifier: ``"xgboost"`` (max_depth 8, otherwise XGBoost defaults) or ``"random_forest"``
            (scikit-learn, balanced class weights).
        model: transformers image model; required by the ViT feature sets.
        n_components: PCA dimensions of the ViT channels.
        crf: refine predictions with a dense CRF (needs the optional ``pydensecrf`` package).
        random_state: seed of the classifier.
        sigmas: Gaussian scales of the classical stack.
        max_side: tile size (pixels) for ViT feature extraction on large images; ``None`` = the whole image in one
            pass (ALiBi-DINOv2 models stream their attention on large images, so memory stays linear in the pixels).
        image_processor: image statistics of the ViT's input (its processor, or a dict with ``image_mean`` and
            ``image_std``, as :func:`alibi_dinov2.hub.models.load_model` returns); ImageNet's when ``None``.
        classifier_params: extra keyword arguments for the classifier (e.g. ``{"n_estimators": 200}``).
        n_jobs: threads for the classifier (``None`` = library default).
        feature_backend: ``"auto"``, ``"numpy"`` or ``"torch"`` for the classical stack.
        feature_cache: a :class:`alibi_dinov2.features.cache.FeatureCache` that keeps computed feature stacks for reuse
            (shared, never copied); ``None`` computes them at every call.

    Attributes (after fit):
        classes_: sorted class values seen in the labels (e.g. ``[1, 2, 3]``).
        feature_names_: names of the feature channels.
        n_features_in_: number of feature channels.
        classifier_: the fitted classifier.
        model_name_: hub id / folder of ``model`` (ViT feature sets), stored by :meth:`save`.
    """

    def __init__(
        self,
        features: str = "classical",
        classifier: str = "xgboost",
        model=None,
        n_components: int = 9,
        crf: bool = False,
        random_state: Optional[int] = 0,
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        max_side: Optional[int] = None,
        image_processor=None,
        classifier_params: Optional[dict] = None,
        n_jobs: Optional[int] = None,
        feature_backend: str = "auto",
        feature_cache=None,
    ):
        self.features = features
        self.classifier = classifier
        self.model = model
        self.n_components = n_components
        self.crf = crf
        self.random_state = random_state
        self.sigmas = sigmas
        self.max_side = max_side
        self.image_processor = image_processor
        self.classifier_params = classifier_params
        self.n_jobs = n_jobs
        self.feature_backend = feature_backend
        self.feature_cache = feature_cache

    def __repr__(self) -> str:
        # Keep the (possibly huge) torch model out of the representation.
        params = self.get_params(deep=False)
        params["model"] = model_name_of(params["model"])
        params.pop("image_processor")
        shown = ", ".join(f"{key}={value!r}" for key, value in params.items())
        return f"{type(self).__name__}({shown})"

    # ---------------------------------------------------------------- validation
    def _check_params(self) -> FeatureExtractor:
        """Checks the settings; returns :meth:`feature_extractor`."""
        extractor = self.feature_extractor()
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"Unknown classifier {self.classifier!r}; allowed values: {', '.join(CLASSIFIERS)}")
        if self.crf:
            _import_densecrf()
        return extractor

    # ---------------------------------------------------------------- features
    def feature_extractor(self) -> FeatureExtractor:
        """The extractor of the ``features`` set with this segmenter's settings (see
        :func:`alibi_dinov2.segmentation.extractors.build_extractor`).

        Raises:
            ValueError: ``features`` names no feature set (the message names the valid ones), or a ViT set lacks
                ``model``.
        """
        return build_extractor(
            self.features,
            model=self.model,
            sigmas=self.sigmas,
            feature_backend=self.feature_backend,
            n_components=self.n_components,
            image_processor=self.image_processor,
            max_side=self.max_side,
        )

    def feature_names(self) -> list[str]:
        """Names of the feature channels this configuration produces."""
        return self.feature_extractor().channel_names

    def extract_features(self, image: np.ndarray) -> np.ndarray:
        """Feature stack of one image.

        Args:
            image: (H, W) or (H, W, 3|4) image.

        Returns:
            float32 (H, W, C), channels as :meth:`feature_names` (read-only when it comes from the cache).
        """
        return self._check_params()(image, cache=self.feature_cache)

    def features_cached(self, image: np.ndarray) -> bool:
        """Whether every feature stack of `image` is in :attr:`feature_cache` (so fitting computes none)."""
        extractor = self._check_params()
        return self.feature_cache is not None and all(key in self.feature_cache for key in extractor.cache_keys(image))

    def image_statistics(self) -> dict[str, list[float]]:
        """``{"image_mean", "image_std"}`` the ViT features normalise with: ``image_processor``'s, else ImageNet's."""
        return image_statistics_of(self.image_processor)

    # ---------------------------------------------------------------- classifier
    def _make_classifier(self):
        extra = dict(self.classifier_params or {})
        if self.classifier == "xgboost":
            from xgboost import XGBClassifier

            return XGBClassifier(**{"max_depth": 8, "random_state": self.random_state, "n_jobs": self.n_jobs, **extra})
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(
            **{"class_weight": "balanced", "random_state": self.random_state, "n_jobs": self.n_jobs, **extra}
        )

    # ---------------------------------------------------------------- fitting
    def fit(self, images, labels) -> "TrainableSegmenter":
        """Train on the labelled pixels of one image or a list of images.

        Args:
            images: image (H, W) / (H, W, 3), or an image file, or a list of them (sizes may differ).
            labels: matching label image(s), int (H, W): 0 = unlabelled, 1..K = classes, or label files.

        Returns:
            self

        Raises:
            ValueError: labels that do not match their image (naming the label and image files, or their
                positions), or no labelled pixels of two classes.
            FileNotFoundError: a label file that does not exist (named, with its image).
        """
        extractor = self._check_params()
        image_list, label_list, names = _training_inputs(images, labels)
        checked = [_check_labels(lab, img.shape, name) for img, lab, name in zip(image_list, label_list, names)]
        if not any(np.any(lab > 0) for lab in checked):
            raise ValueError(_NO_LABELS_MESSAGE)
        self._check_class_count(checked)
        channels = _common_channels(image_list)
        rows, targets = [], []
        for image, lab in zip(image_list, checked):
            if not np.any(lab > 0):
                continue  # skip feature extraction for images without scribbles
            mask = lab > 0
            stacks = extractor.part_stacks(image, self.feature_cache)
            rows.append(np.concatenate([stack[mask] for stack in stacks], axis=1))
            targets.append(lab[mask])
        self._fit_rows(np.concatenate(rows), np.concatenate(targets), extractor)
        self.n_image_channels_ = channels
        return self

    def fit_features(self, feature_maps: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> "TrainableSegmenter":
        """Train on precomputed feature stacks (from :meth:`extract_features`); saves recomputing
        features when the same images are labelled again, as in the scribble benchmark.

        Args:
            feature_maps: list of (H, W, C) float arrays.
            labels: list of (H, W) label images (0 = unlabelled).
        """
        extractor = self._check_params()
        if len(feature_maps) != len(labels):
            raise ValueError(f"Got {len(feature_maps)} feature map(s) but {len(labels)} label image(s)")
        checked = [_check_labels(lab, fm.shape, (f"label image {i}", f"feature map {i}"))
                   for i, (fm, lab) in enumerate(zip(feature_maps, labels))]
        if not any(np.any(lab > 0) for lab in checked):
            raise ValueError(_NO_LABELS_MESSAGE)
        self._check_class_count(checked)
        rows = np.concatenate([fm[lab > 0] for fm, lab in zip(feature_maps, checked)])
        targets = np.concatenate([lab[lab > 0] for lab in checked])
        return self._fit_rows(rows, targets, extractor)

    @staticmethod
    def _check_class_count(labels: Sequence[np.ndarray]) -> None:
        present = np.unique(np.concatenate([np.unique(lab[lab > 0]) for lab in labels]))
        if len(present) < 2:
            raise ValueError(
                f"Only one class ({present.tolist()}) is labelled; a segmenter needs scribbles of at least two classes"
            )

    def _fit_rows(self, rows: np.ndarray, targets: np.ndarray, extractor: FeatureExtractor) -> "TrainableSegmenter":
        names = extractor.channel_names
        if rows.shape[1] != len(names):
            raise ValueError(f"Feature maps have {rows.shape[1]} channels; this configuration produces {len(names)}")
        self.classes_ = np.unique(targets)
        self.feature_names_ = names
        self.n_features_in_ = rows.shape[1]
        self.model_name_ = model_name_of(self.model) if uses_model(self.features) else None
        self.n_image_channels_ = None  # unknown when trained on feature maps; fit() records it
        self.classifier_ = self._make_classifier()
        self.classifier_.fit(rows.astype(np.float32), np.searchsorted(self.classes_, targets))
        return self

    # ---------------------------------------------------------------- prediction
    def _check_fitted(self) -> None:
        check_is_fitted(self, "classifier_")  # sklearn's NotFittedError

    def _check_channels(self, image: np.ndarray) -> None:
        expected = getattr(self, "n_image_channels_", None)
        if expected is not None and image_channels(image) != expected:
            raise ValueError(
                f"The image has {image_channels(image)} channel(s) but this segmenter was trained on images with "
                f"{expected}; convert the image (e.g. to {'grayscale' if expected == 1 else f'{expected} channels'}) "
                "or train a segmenter on images like it"
            )

    def _probabilities_from_parts(self, parts: Sequence[np.ndarray], image=None) -> np.ndarray:
        """Class probabilities from an image's feature stacks (joined a block of pixels at a time), CRF-refined
        with ``crf=True``."""
        height, width = parts[0].shape[:2]
        channels = sum(part.shape[-1] for part in parts)
        if channels != self.n_features_in_:
            raise ValueError(
                f"Feature map has {channels} channels, the segmenter was trained on {self.n_features_in_}"
            )
        flat = [part.reshape(-1, part.shape[-1]) for part in parts]
        probabilities = np.empty((height * width, len(self.classes_)), dtype=np.float32)
        for start in range(0, height * width, _PREDICT_CHUNK_ROWS):
            chunk = np.concatenate([rows[start : start + _PREDICT_CHUNK_ROWS] for rows in flat], axis=1)
            probabilities[start : start + len(chunk)] = self.classifier_.predict_proba(chunk)
        probabilities = probabilities.reshape(height, width, -1)
        return dense_crf(image, probabilities) if self.crf else probabilities

    def predict_proba_features(self, feature_maps, images=None):
        """Class probabilities from precomputed feature stacks.

        Args:
            feature_maps: (H, W, C) array or list of them.
            images: the matching images, needed only when ``crf=True``.

        Returns:
            float32 (H, W, K) (or a list), channel k = probability of ``classes_[k]``.
        """
        self._check_fitted()
        maps, single = _as_image_list(feature_maps)
        if self.crf:
            if images is None:
                raise ValueError("crf=True needs the images as well as their feature maps")
            image_list, _ = _as_image_list(images)
        results = [
            self._probabilities_from_parts([feature_map], image_list[index] if self.crf else None)
            for index, feature_map in enumerate(maps)
        ]
        return results[0] if single else results

    def predict_features(self, feature_maps, images=None):
        """Masks (int32 (H, W), values from ``classes_``) from precomputed feature stacks."""
        probabilities = self.predict_proba_features(feature_maps, images)
        if isinstance(probabilities, list):
            return [self._to_mask(p) for p in probabilities]
        return self._to_mask(probabilities)

    def _to_mask(self, probabilities: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(probabilities, axis=-1)].astype(np.int32)

    def predict_proba(self, images):
        """Class probabilities of one image (H, W, K) or a list of images (list of arrays).

        With ``crf=True`` these are the CRF-refined marginals.
        """
        self._check_fitted()
        extractor = self._check_params()
        image_list, single = _as_image_list(images)
        for image in image_list:
            self._check_channels(image)
        results = [
            self._probabilities_from_parts(extractor.part_stacks(image, self.feature_cache), image)
            for image in image_list
        ]
        return results[0] if single else results

    def predict(self, images):
        """Segment one image (-> int32 (H, W)) or a list of images (-> list of masks).

        Mask values are the class values seen in training (1..K).
        """
        probabilities = self.predict_proba(images)
        if isinstance(probabilities, list):
            return [self._to_mask(p) for p in probabilities]
        return self._to_mask(probabilities)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save the fitted segmenter to one file (see :mod:`alibi_dinov2.segmentation.segmenter_file`).

        The torch model is not stored, only its hub id / folder (``model_name_``) and, for ViT features, the image
        statistics they were computed with; pass the model again to :meth:`load`. The file holds JSON settings and
        the classifier in a data-only format, so loading never runs code from the file.
        """
        from alibi_dinov2.segmentation.segmenter_file import write_segmenter

        self._check_fitted()
        params = self.get_params(deep=False)
        for unsaved in ("model", "image_processor", "feature_cache"):
            params.pop(unsaved)
        params["sigmas"] = list(params["sigmas"])
        settings = {
            "params": params,
            "model_name": self.model_name_,
            "classes": self.classes_.tolist(),
            "feature_names": self.feature_names_,
            "image_channels": self.n_image_channels_,
            "image_statistics": self.image_statistics() if uses_model(self.features) else None,
        }
        write_segmenter(path, settings, self.classifier_)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model=None, image_processor=None, feature_cache=None
    ) -> "TrainableSegmenter":
        """Load a segmenter written by :meth:`save`.

        Args:
            path: the saved file.
            model: the transformers model, required when the segmenter uses ViT features (the file
                names the model it was trained with).
            image_processor: image statistics for the ViT features; default: those the file records (the ones
                it was trained with; ImageNet's for files that record none).
            feature_cache: see the class.
        """
        from alibi_dinov2.segmentation.segmenter_file import read_segmenter

        settings, read_classifier = read_segmenter(path)
        params = {**settings["params"], "sigmas": tuple(settings["params"]["sigmas"])}
        if image_processor is None:
            image_processor = settings.get("image_statistics")
        segmenter = cls(**params, model=model, image_processor=image_processor, feature_cache=feature_cache)
        segmenter._check_model(model, settings["model_name"])
        segmenter.classifier_ = read_classifier(segmenter._make_classifier())
        segmenter.classes_ = np.asarray(settings["classes"])
        segmenter.feature_names_ = list(settings["feature_names"])
        segmenter.n_features_in_ = len(segmenter.feature_names_)
        segmenter.n_image_channels_ = settings["image_channels"]
        segmenter.model_name_ = settings["model_name"]
        return segmenter

    def _check_model(self, model, model_name: Optional[str]) -> None:
        uses_vit = uses_model(self.features)
        if uses_vit and model is None:
            raise ValueError(
                f"This segmenter uses {self.features!r} features of the model {model_name!r}; "
                "load that model (e.g. transformers.AutoModel.from_pretrained(name, trust_remote_code=True)) "
                "and pass it as model="
            )
        if uses_vit and model_name_of(model) != model_name:
            import warnings

            warnings.warn(
                f"Segmenter was trained with model {model_name!r} but got {model_name_of(model)!r}", stacklevel=3
            )
