"""The run options the Accelerate jobs share (`RunArguments`): names, checks, derived values, and their use."""

import dataclasses

import pytest

from alibi_dinov2.errors import InputError
from alibi_dinov2.training.arguments import RunArguments, parse_checkpointing_steps


def test_checkpointing_steps_take_a_positive_number_or_epoch():
    assert parse_checkpointing_steps(None) is None and parse_checkpointing_steps("epoch") == "epoch"
    assert parse_checkpointing_steps("25") == 25 and parse_checkpointing_steps(3) == 3
    for bad in ("often", "0", "-2", "2.5", 0):
        with pytest.raises(InputError, match="--checkpointing_steps must be a positive integer or `epoch`"):
            parse_checkpointing_steps(bad)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"per_device_train_batch_size": 0}, "--per_device_train_batch_size must be a positive integer"),
        ({"num_train_epochs": 0}, "--num_train_epochs must be a positive integer"),
        ({"max_train_steps": 0}, "--max_train_steps must be a positive integer (or left unset)"),
        ({"checkpoints_total_limit": -1}, "--checkpoints_total_limit must be a positive integer"),
        ({"weight_decay": -0.1}, "--weight_decay must be >= 0"),
        ({"dataloader_num_workers": -1}, "--dataloader_num_workers must be >= 0"),
        ({"learning_rate": 0.0}, "--learning_rate must be positive"),
        ({"mixed_precision": "fp8"}, "--mixed_precision must be no, fp16 or bf16 (or unset)"),
        ({"resume_from_checkpoint": "/no/such/checkpoint"}, "is not a folder (or use `latest`)"),
    ],
)
def test_each_bad_value_is_refused_naming_its_option(options, message):
    with pytest.raises(InputError) as error:
        RunArguments(**options)
    assert message in str(error.value)


def test_derived_values(tmp_path):
    arguments = RunArguments(output_dir=str(tmp_path / "my-run"), push_to_hub=True, report_to=" none ")
    assert arguments.hub_model_id == "my-run" and arguments.trackers is None
    assert RunArguments(report_to="tensorboard").trackers == "tensorboard"
    assert RunArguments(push_to_hub=True, output_dir=str(tmp_path), hub_model_id="me/x").hub_model_id == "me/x"
    assert RunArguments(resume_from_checkpoint="latest").resume_from_checkpoint == "latest"
    assert RunArguments(checkpointing_steps="10").checkpointing_steps == 10


def test_the_distillation_options_are_the_shared_ones_plus_its_own():
    import train_distill

    shared = {f.name: f.default for f in dataclasses.fields(RunArguments)}
    options = {f.name: f.default for f in dataclasses.fields(train_distill.DistillationArguments)}
    assert issubclass(train_distill.DistillationArguments, RunArguments)
    assert {name: options[name] for name in shared} == shared  # same names and defaults
    assert {"teacher", "variant", "blank_channels", "probe_image_size"} <= set(options) - set(shared)


def test_the_linear_segmentation_options_are_the_shared_ones_with_the_probes_defaults():
    from evaluation.linear_segmentation import LinearSegmentationConfig

    shared = {f.name: f.default for f in dataclasses.fields(RunArguments)}
    options = {f.name: f.default for f in dataclasses.fields(LinearSegmentationConfig)}
    assert issubclass(LinearSegmentationConfig, RunArguments)
    changed = {name: options[name] for name in shared if options[name] != shared[name]}
    assert changed == {
        "output_dir": "outputs/linseg", "seed": 0, "per_device_train_batch_size": 16, "num_train_epochs": 50,
        "learning_rate": 1e-3, "checkpointing_steps": "epoch", "report_to": "none",
    }
    assert shared["checkpoints_total_limit"] == 2  # every job keeps its newest two checkpoints unless told
    assert {"model", "num_classes", "per_device_eval_batch_size", "robustness"} <= set(options) - set(shared)


def test_cpu_and_private_repo_reach_the_accelerator_and_the_hub(tmp_path, monkeypatch):
    import train_distill
    from alibi_dinov2.training import distillation

    seen = {}

    class Stop(Exception):
        pass

    def fake_make_accelerator(output_dir, **options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr(distillation, "make_accelerator", fake_make_accelerator)
    arguments = train_distill.parse_args(
        ["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--cpu", "--hub_private_repo",
         "--push_to_hub", "--report_to", "none"]
    )  # fmt: skip
    assert arguments.hub_private_repo and arguments.hub_model_id == "out"
    with pytest.raises(Stop):
        distillation.setup_accelerator(arguments)
    assert seen["cpu"] is True and seen["log_with"] is None
