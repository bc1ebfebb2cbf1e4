"""Semantic-segmentation linear probes on frozen ViT patch features (paper Table 3, S7), with a command line.

A frozen backbone (DINOv2 with or without registers, ALiBi-DINOv2, or another transformers ViT giving patch
tokens, loaded with ``AutoModel.from_pretrained(name, trust_remote_code=True)``) turns each image into a
``(C, h, w)`` map of patch features. A BatchNorm + 1x1 linear classifier maps them to class logits, which are
bilinearly upsampled to the label resolution and trained with cross-entropy (ignore index 255 by default) and
AdamW (lr 1e-3, weight decay 0.01). The score is the mIoU on the validation split (:mod:`evaluation.metrics`,
classes 0 .. K-1).

Modules:

* :mod:`.config`: :class:`LinearSegmentationConfig`, every setting (the config-file keys and the options): the
  shared run options (:class:`alibi_dinov2.training.arguments.RunArguments`) with the probe's defaults, and its own;
* :mod:`.data`: backbone features, image splits (unreadable images skipped), the feature cache, the data order and
  the robustness transforms;
* :mod:`.head`: the head and its loss;
* :mod:`.estimator`: :class:`LinearSegmentationProbe`, a scikit-learn estimator on feature arrays;
* :mod:`.training`: training and evaluation under Accelerate, and a full run in steps;
* :mod:`.figures`: the examples figure;
* :mod:`.cli`: the command line (``python -m evaluation.linear_segmentation``).

Command line::

    python -m evaluation.linear_segmentation configs/linear_seg_voc2012.json --model NAME \\
        --output_dir outputs/linseg [--robustness] [--resume_from_checkpoint latest] [--push_to_hub]

Every configuration key is also an option (``--help`` lists them); options typed after the config file override
it. Training runs under Accelerate (``--num_processes N`` for several GPUs, or ``accelerate launch -m
evaluation.linear_segmentation ...``;
``--mixed_precision bf16``; unset, accelerate's own setting applies) through the run layer
:mod:`alibi_dinov2.training.runs`. Outputs in ``--output_dir``:

* ``results.json``: validation mIoU (classes present in the ground truth or the prediction), per-class IoU,
  pixel accuracy, training losses, the skipped images and, with ``--robustness``, the mIoU per input transform;
* ``examples.png``: validation images | ground truth | prediction;
* ``probe/``: the trained head (``head.safetensors`` + ``probe_config.json``), see :class:`LinearSegmentationProbe`;
* ``feature_cache/<split>``: backbone features in float16, computed once and reused across epochs and runs.

Beside it, in ``OUTPUT_DIR-run/``: ``checkpoints/checkpoint_<step:08d>`` (``accelerator.save_state`` folders, complete
or absent, at the end of every epoch (``--checkpointing_steps epoch``, the default) or every N steps, the last
``checkpoints_total_limit`` kept) and the tracker logs (``logs/``).

Data sources (see :mod:`evaluation.linear_segmentation.datasets`): a Hub dataset name or ``save_to_disk`` folder
(``--dataset_name``, with ``--image_column`` / ``--mask_column``), or a local folder (``--data_dir``) laid out as
``ROOT/<split>/images/x.jpg`` + ``ROOT/<split>/masks/x.png``, or a ``VOCdevkit/VOC20xx`` folder. Images are read by
:mod:`alibi_dinov2.io.images`; one that cannot be read or is smaller than a patch is skipped with a warning naming it
and a final count (``--strict`` fails instead).

Robustness mode (``--robustness``): each validation image is transformed (``flip_ud``, ``roll`` by whole
patches, ``rot90``), its features are extracted, the transform is undone on the feature map and the trained probe
is applied; the mIoU per transform is reported next to the untransformed baseline (``none``). ALiBi-DINOv2 with
wrap-around distances is exactly equivariant to rolls by whole patches, so its ``roll`` score equals the baseline.
"""

from evaluation.linear_segmentation.cli import build_parser, main, parse_args
from evaluation.linear_segmentation.config import (
    FIELD_HELP,
    RENAMED_SETTINGS,
    TRANSFORMS,
    LinearSegmentationConfig,
    make_config,
    validate_config,
)
from evaluation.linear_segmentation.data import (
    CachedFeatureDataset,
    EpochShuffleSampler,
    build_feature_cache,
    drop_unusable_images,
    load_backbone,
    patch_feature_maps,
    transform_images,
    undo_transform_on_features,
)
from evaluation.linear_segmentation.estimator import LinearSegmentationProbe
from evaluation.linear_segmentation.figures import colourise_labels, label_palette, plot_example_predictions
from evaluation.linear_segmentation.head import LinearSegmentationHead, make_segmentation_head, segmentation_loss
from evaluation.linear_segmentation.training import (
    TrainingProgress,
    evaluate_head,
    format_summary,
    run_linear_segmentation,
    train_head,
)


__all__ = [
    "FIELD_HELP",
    "RENAMED_SETTINGS",
    "TRANSFORMS",
    "CachedFeatureDataset",
    "EpochShuffleSampler",
    "LinearSegmentationConfig",
    "LinearSegmentationHead",
    "LinearSegmentationProbe",
    "TrainingProgress",
    "build_feature_cache",
    "build_parser",
    "colourise_labels",
    "drop_unusable_images",
    "evaluate_head",
    "format_summary",
    "label_palette",
    "load_backbone",
    "main",
    "make_config",
    "make_segmentation_head",
    "parse_args",
    "patch_feature_maps",
    "plot_example_predictions",
    "run_linear_segmentation",
    "segmentation_loss",
    "train_head",
    "transform_images",
    "undo_transform_on_features",
    "validate_config",
]
