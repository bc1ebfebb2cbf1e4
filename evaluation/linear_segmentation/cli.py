"""The command line: ``python -m evaluation.linear_segmentation [CONFIG.json|yaml] --model NAME [options]``."""

from __future__ import annotations

import sys
from typing import Sequence

from alibi_dinov2.cli import ArgumentParser
from alibi_dinov2.errors import InputError
from alibi_dinov2.training.launch import launch, needs_launch
from evaluation.linear_segmentation.config import RENAMED_SETTINGS, LinearSegmentationConfig, validate_config
from evaluation.linear_segmentation.training import run_linear_segmentation


PROG = "python -m evaluation.linear_segmentation"


def build_parser() -> ArgumentParser:
    """One option per configuration key (help text from the dataclass fields), an optional leading config file."""
    return ArgumentParser(
        LinearSegmentationConfig,
        renamed=RENAMED_SETTINGS,
        prog=PROG,
        usage=f"{PROG} [CONFIG.json|.yaml] --model NAME [--output_dir DIR] [--robustness] "
        "[--resume_from_checkpoint latest] [options]",
        description="Semantic-segmentation linear probe on a frozen ViT backbone (BatchNorm + 1x1 linear head). "
        "A JSON or YAML config file given first sets any of the options below; options typed after it win "
        "(--data_dir or --dataset_name typed here replaces the file's data source). The run options "
        "(--per_device_train_batch_size, --num_train_epochs, --max_train_steps, --checkpointing_steps, "
        "--mixed_precision, --push_to_hub, ...) are those of every Accelerate job of the project.",
        epilog=f"Example: {PROG} configs/linear_seg_voc2012.json --model facebook/dinov2-with-registers-small "
        "--output_dir outputs/linseg --robustness",
        allow_abbrev=False,
    )


def parse_args(argv: Sequence[str] | None = None) -> LinearSegmentationConfig:
    """Command line -> validated configuration; exits with a message naming the problem for bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    (config,) = parser.parse(argv)
    typed = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    # A data source typed on the command line replaces the config file's, whichever kind that is.
    for chosen, other in (("data_dir", "dataset_name"), ("dataset_name", "data_dir")):
        if chosen in typed and other not in typed:
            setattr(config, other, None)
    try:
        return validate_config(config)
    except InputError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run the probe described by the command-line tokens `argv` (`None`: `sys.argv[1:]`); returns the results
    (None when `--num_processes` above 1 started the processes here: the results are in `--output_dir`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv)
    if needs_launch(config.num_processes):
        return launch("alibi-linear-seg", argv, config.num_processes, config.mixed_precision)
    return run_linear_segmentation(config)
