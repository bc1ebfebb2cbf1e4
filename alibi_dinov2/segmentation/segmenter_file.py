"""The saved-segmenter file: a zip archive of data only, safe to load from an untrusted source.

    settings.json        format name, version, estimator parameters, model id, classes, feature names,
                         channel count of the training images, image statistics (mean, std) of the ViT
                         features (absent or null in files of classical features and in older files)
    classifier.json      an XGBoost classifier in XGBoost's own JSON format, or
    classifier.skops     a scikit-learn random forest in skops' format (loaded with skops' audit; only the
                         reviewed tree type is trusted)

Reading never unpickles: a file that is not such an archive (a pickle, for instance) is refused.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Callable, Union

from alibi_dinov2.errors import InputError
from alibi_dinov2.io.files import atomic_path


PathLike = Union[str, os.PathLike]
FORMAT = "alibi-dinov2/trainable-segmenter"
VERSION = 2
_SETTINGS = "settings.json"
_XGBOOST = "classifier.json"
_SKOPS = "classifier.skops"
# The one type beyond skops' defaults a random forest needs (its node arrays); reviewed, holds no code.
_SKOPS_TRUSTED = ["sklearn.tree._tree.Tree"]


def _classifier_bytes(classifier) -> tuple[str, bytes]:
    if hasattr(classifier, "get_booster"):
        return _XGBOOST, bytes(classifier.get_booster().save_raw("json"))
    import skops.io

    return _SKOPS, skops.io.dumps(classifier)


def write_segmenter(path: PathLike, settings: dict, classifier) -> None:
    """Write `settings` (JSON-serialisable) and the fitted `classifier` to `path`, atomically."""
    name, data = _classifier_bytes(classifier)
    with atomic_path(path) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(_SETTINGS, json.dumps({"format": FORMAT, "version": VERSION, **settings}, indent=2))
            archive.writestr(name, data)


def _read_settings(archive: zipfile.ZipFile, path: PathLike) -> dict:
    try:
        settings = json.loads(archive.read(_SETTINGS))
    except (KeyError, ValueError) as error:
        raise InputError(f"{path} is not a saved TrainableSegmenter (no readable {_SETTINGS})") from error
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise InputError(f"{path} is not a saved TrainableSegmenter")
    if settings.get("version") != VERSION:
        raise InputError(f"{path} has segmenter format {settings.get('version')}; this version reads {VERSION}")
    return settings


def _classifier_reader(data: bytes, name: str) -> Callable:
    def read(empty_classifier):
        if name == _XGBOOST:
            empty_classifier.load_model(bytearray(data))
            return empty_classifier
        import skops.io

        return skops.io.loads(data, trusted=_SKOPS_TRUSTED)

    return read


def read_segmenter(path: PathLike) -> tuple[dict, Callable]:
    """Settings of the file at `path` and a function that fills an unfitted classifier from it.

    Raises:
        InputError (a ValueError): the file is not a saved segmenter of this format (pickles and other files are
            refused without being executed).
    """
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a saved TrainableSegmenter (expected its zip archive; pickles are refused)")
    with zipfile.ZipFile(path) as archive:
        settings = _read_settings(archive, path)
        names = [name for name in (_XGBOOST, _SKOPS) if name in archive.namelist()]
        if len(names) != 1:
            raise InputError(f"{path} holds no classifier ({_XGBOOST} or {_SKOPS})")
        data = archive.read(names[0])
    return settings, _classifier_reader(data, names[0])
