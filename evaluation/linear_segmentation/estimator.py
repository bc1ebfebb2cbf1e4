"""A scikit-learn estimator of the linear probe on arrays of patch features."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from alibi_dinov2.io.files import atomic_path, write_json_atomic
from evaluation.linear_segmentation.data import EpochShuffleSampler
from evaluation.linear_segmentation.head import LinearSegmentationHead, make_segmentation_head, segmentation_loss
from evaluation.metrics import segmentation_scores


PathLike = Union[str, os.PathLike]

# The constructor parameters written to probe_config.json (the device and verbosity belong to the session); all
# are also settings of a command-line run (`epochs` and `batch_size` as --num_train_epochs and
# --per_device_train_batch_size).
SAVED_PARAMS = ("num_classes", "ignore_index", "learning_rate", "weight_decay", "epochs", "batch_size", "seed",
                 "class_names")


def _as_tensor(array, dtype=None) -> torch.Tensor:
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    return tensor if dtype is None else tensor.to(dtype)


class LinearSegmentationProbe(BaseEstimator):
    """BatchNorm + 1x1 linear probe on patch-feature maps, trained with torch; a scikit-learn estimator.

    ``fit(features (N, C, h, w), labels (N, H, W))``, ``predict(features, output_size) -> (N, H, W)``,
    ``evaluate(features, labels) -> scores``, ``score(features, labels) -> mIoU``, ``save(folder)`` /
    ``LinearSegmentationProbe.load(folder)``. The command-line run trains the same head under Accelerate and
    stores it in this form. Labels are classes ``0 .. num_classes - 1`` and `ignore_index` (unlabelled).

    The constructor only stores its parameters (``get_params`` / ``set_params`` / ``sklearn.base.clone`` work);
    they are checked by :meth:`fit`.

    Attributes (after fit or load):
        head_: the :class:`LinearSegmentationHead`.
        in_channels_: feature channels C.
        loss_curve_: mean training loss per epoch.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        epochs: int = 10,
        batch_size: int = 16,
        seed: int = 0,
        device: str | torch.device | None = None,
        class_names: Sequence[str] | None = None,
        verbose: bool = False,
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.class_names = class_names
        self.verbose = verbose

    def _torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- estimator API
    def fit(self, features, labels) -> "LinearSegmentationProbe":
        """Train on (N, C, h, w) features and (N, H, W) integer labels (`ignore_index` = unlabelled)."""
        features, labels = _as_tensor(features), _as_tensor(labels, torch.int64)
        num_classes, ignore_index, batch_size = int(self.num_classes), int(self.ignore_index), int(self.batch_size)
        if features.ndim != 4 or labels.ndim != 3 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"fit expects features (N, C, h, w) and labels (N, H, W); got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}."
            )
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"labels hold values {torch.unique(labels[bad])[:10].tolist()} outside 0 .. {num_classes - 1} "
                f"and not the ignore index {ignore_index}."
            )
        device = self._torch_device()
        head = make_segmentation_head(features.shape[1], num_classes, int(self.seed)).to(device)
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=float(self.learning_rate), weight_decay=float(self.weight_decay)
        )
        sampler = EpochShuffleSampler(len(features), int(self.seed))
        loss_curve = []
        head.train()
        for epoch in tqdm(range(int(self.epochs)), desc="epochs", disable=not self.verbose):
            sampler.set_epoch(epoch)
            order = list(sampler)
            losses = []
            for start in range(0, len(order), batch_size):
                index = torch.as_tensor(order[start : start + batch_size])
                batch_labels = labels[index].to(device)
                logits = head(features[index].to(device), output_size=batch_labels.shape[-2:])
                loss = segmentation_loss(logits, batch_labels, ignore_index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            loss_curve.append(float(np.mean(losses)))
        self.head_, self.in_channels_, self.loss_curve_ = head.eval(), int(features.shape[1]), loss_curve
        return self

    def _batched_logits(self, features, output_size: tuple[int, int] | None):
        """Logits of `batch_size` samples at a time, so that full-resolution logits never exist for all at once."""
        check_is_fitted(self, "head_")
        features = _as_tensor(features)
        device = next(self.head_.parameters()).device
        batch_size = int(self.batch_size)
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                yield self.head_.eval()(features[start : start + batch_size].to(device), output_size)

    def predict_logits(self, features, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """(N, C, h, w) features -> (N, K, H, W) float32 logits (H, W = output_size, else h, w)."""
        return torch.cat([logits.float().cpu() for logits in self._batched_logits(features, output_size)]).numpy()

    def predict(self, features, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """(N, C, h, w) features -> (N, H, W) int64 class indices."""
        batches = self._batched_logits(features, output_size)
        return torch.cat([logits.argmax(dim=1).cpu() for logits in batches]).numpy().astype(np.int64)

    def evaluate(self, features, labels) -> dict:
        """Scores (:func:`evaluation.metrics.segmentation_scores`) of the predictions at the labels' resolution."""
        labels = np.asarray(labels)
        predictions = self.predict(features, output_size=labels.shape[-2:])
        return segmentation_scores(
            predictions,
            labels,
            int(self.num_classes),
            ignore_index=int(self.ignore_index),
            class_names=self.class_names,
        )

    def score(self, features, labels) -> float:
        """Validation mIoU (scikit-learn's `score`: higher is better)."""
        return self.evaluate(features, labels)["miou"]

    # -- persistence
    def save(self, folder: PathLike) -> Path:
        """Write ``head.safetensors`` and ``probe_config.json`` to `folder` (each file replaced atomically)."""
        from safetensors.torch import save_file

        check_is_fitted(self, "head_")
        folder = Path(folder)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.head_.state_dict().items()}
        with atomic_path(folder / "head.safetensors") as temporary:
            save_file(state, str(temporary))
        settings = {name: getattr(self, name) for name in SAVED_PARAMS}
        settings["class_names"] = list(self.class_names) if self.class_names is not None else None
        settings.update(in_channels=self.in_channels_, loss_curve=getattr(self, "loss_curve_", None))
        write_json_atomic(folder / "probe_config.json", settings)
        return folder

    @classmethod
    def load(cls, folder: PathLike, device: str | torch.device | None = None) -> "LinearSegmentationProbe":
        """A fitted probe from a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / "probe_config.json", folder / "head.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{folder} holds no saved probe (probe_config.json + head.safetensors).")
        settings = json.loads(config_path.read_text())
        in_channels, loss_curve = settings.pop("in_channels"), settings.pop("loss_curve", None)
        head = LinearSegmentationHead(in_channels, int(settings["num_classes"]))
        head.load_state_dict(load_file(str(weights_path)))
        probe = cls.from_head(head, loss_curve, **settings, device=device)
        probe.head_.to(probe._torch_device())
        return probe

    @classmethod
    def from_head(
        cls, head: LinearSegmentationHead, loss_curve: Sequence[float] | None = None, **params
    ) -> "LinearSegmentationProbe":
        """A fitted probe around an already trained head (the command-line run trains one under Accelerate).

        Args:
            head: the trained :class:`LinearSegmentationHead`; kept as it is (in eval mode), not copied.
            loss_curve: its mean training loss per epoch, kept as ``loss_curve_`` when given.
            params: constructor parameters (learning rate, epochs, class names, ...) recorded with the probe;
                `num_classes` defaults to the head's number of outputs and must match it.

        Raises:
            ValueError: `num_classes` differs from the head's number of outputs.
        """
        outputs = int(head.classifier.out_channels)
        params.setdefault("num_classes", outputs)
        if int(params["num_classes"]) != outputs:
            raise ValueError(f"num_classes={params['num_classes']} for a head with {outputs} outputs.")
        probe = cls(**params)
        probe.head_, probe.in_channels_ = head.eval(), int(head.norm.num_features)
        if loss_curve is not None:
            probe.loss_curve_ = list(loss_curve)
        return probe

