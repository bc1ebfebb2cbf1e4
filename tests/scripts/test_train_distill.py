"""train_distill.py: distillation of a tiny random DINOv2 into its ALiBi student, on generated images, on CPU.

Covers the training signal (loss falls, the saved folder reloads as remote code with identical outputs), exact
resumption after a kill, a two-process launch, unreadable, too small and unusual image files (skipped, or fatal
with --strict), cached targets, channel blanking, patch rolls, the config file and the command-line errors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_distill
from alibi_dinov2.cli import run_command
from alibi_dinov2.errors import SourceNotFoundError
from alibi_dinov2.features.preprocessing import IMAGENET_MEAN, IMAGENET_STD, resize_and_crop
from alibi_dinov2.io.images import ImageReadError, read_rgb01
from alibi_dinov2.training import distillation
from alibi_dinov2.training import runs as training_runs
from alibi_dinov2.training.data import (
    DistillationImages,
    content_key,
    decode_message,
    prepare_probe_images,
    preprocess_image,
)
from alibi_dinov2.training.distillation import AUTO_BLANK_CHANNEL_COUNT, TRACKER_PROJECT
from alibi_dinov2.training.objective import distillation_loss, random_patch_shifts, roll_by_patches
from alibi_dinov2.training.students import build_student
from alibi_dinov2.training.targets import TeacherTargetCache, batch_targets, teacher_fingerprint
from configuration_alibi_dinov2 import AlibiDinov2Config
from conftest import REPO_ROOT
from evaluation.distillation_probe import DistillationProbe
from evaluation.positional_probe import most_positional_channels
from modeling_alibi_dinov2 import AlibiDinov2Model


# 18 x 18 patches: the sparse probe (step 6) then samples 9 of them.
PROBE_SIZE = "266"  # 19 x 19 patches: the 10 samples the probe protocol needs at step 6


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 RGB image of random stripes and blobs, with some noise."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        np.sin(x / rng.uniform(3, 12) + phase) * np.cos(y / rng.uniform(3, 12) - phase)
        for phase in rng.uniform(0, 3, 3)
    ]
    image = (np.stack(channels, axis=-1) + 1) * 127.5 + rng.normal(0, 8, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        height, width = rng.integers(56, 85, size=2)
        path = folder / ("nested" if index % 3 == 0 else "") / f"image_{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(rng, int(height), int(width))).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def teacher_folder(tmp_path, tiny_kwargs):
    """A tiny stock DINOv2 with 2 registers, saved by transformers' own class (what a Hub id would give)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tiny_kwargs, num_register_tokens=2))
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 12)
    return folder


def flags(teacher, data, output, *extra) -> list[str]:
    return [
        "--teacher", str(teacher),
        "--train_dir", str(data),
        "--output_dir", str(output),
        "--image_size", "56",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "2e-3",
        "--num_probe_images", "2",
        "--probe_image_size", PROBE_SIZE,
        "--dataloader_num_workers", "0",
        "--report_to", "none",
        "--seed", "0",
        *map(str, extra),
    ]  # fmt: skip


def max_weight_difference(first: torch.nn.Module, second: torch.nn.Module) -> float:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    return max((first_state[k].float() - second_state[k].float()).abs().max().item() for k in first_state)


# --- end to end ------------------------------------------------------------------------------------------------------


def test_loss_falls_and_the_saved_model_reloads_with_identical_outputs(teacher_folder, image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModel

    output = tmp_path / "run"
    args = flags(teacher_folder, image_folder, output, "--num_train_epochs", 6, "--report_to", "tensorboard")
    args += ["--probe_every_n_steps", "6", "--blank_channels", "3", "17", "--logging_steps", "3"]
    result = train_distill.main(args)
    summary = result.summary

    losses = summary["epoch_losses"]
    assert len(losses) == 6 and summary["global_step"] == 18  # 10 training images (2 held out), batch 4
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["images_seen"] == 60 and summary["skipped_images"] == 0
    assert summary["blank_channels"] == [3, 17]
    assert json.loads((output / "train_summary.json").read_text()) == summary
    assert summary["probe"]["step"] == 18 and -10 < summary["probe"]["probe_r2_lr_ud"] <= 1
    assert [entry["step"] for entry in summary["evaluations"]] == [0, 6, 12, 18]
    history = summary["evaluations"]
    assert history[-1]["patch_cosine_to_teacher"] == summary["probe"]["patch_cosine_to_teacher"]
    assert history[-1]["patch_cosine_to_teacher"] > history[0]["patch_cosine_to_teacher"]

    reloaded = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "AlibiDinov2Model" and reloaded.config.use_alibi
    assert reloaded.config.use_absolute_position_embeddings is False
    pixel_values = torch.randn(2, 3, 70, 84)
    with torch.no_grad():
        expected = result.model.eval()(pixel_values).last_hidden_state
        actual = reloaded(pixel_values).last_hidden_state
    assert torch.equal(actual, expected)

    card = (output / "README.md").read_text()
    assert "| `learning_rate` | `0.002` |" in card and "| `blank_channels` | `[3, 17]` |" in card
    assert f"held-out, {PROBE_SIZE} px (student) | {summary['probe']['probe_r2_lr_ud']:.4g} |" in card
    assert (output / "preprocessor_config.json").is_file()

    logs = training_runs.run_folder(output) / training_runs.LOGS_FOLDER
    events = EventAccumulator(str(logs / TRACKER_PROJECT)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/images_per_second", "train/skipped_images"} <= tags
    assert {"probe/r2_lr_ud", "probe/patch_cosine", "probe/teacher_r2_lr_ud", "train/epoch_loss"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [3, 6, 9, 12, 15, 18]
    assert [event.step for event in events.Scalars("probe/r2_lr_ud")] == [0, 6, 12, 18]
    # The held-out patch cosine to the teacher improves on the initial student (teacher weights, no position
    # embedding).
    cosines = [event.value for event in events.Scalars("probe/patch_cosine")]
    assert cosines[-1] > cosines[0]


def test_distillation_loss_falls_on_a_tiny_dinov3_teacher(image_folder, tmp_path):
    """A DINOv3 teacher (RoPE) gives an ALiBi-DINOv3 student, converted from it by the same code path. The teacher is
    the quickstart's synthetic DINOv3, whose features depend on its RoPE (a random one barely does)."""
    from transformers import AutoModel

    from alibi_dinov2.synthetic.teachers import build_synthetic_dinov3_teacher

    build_synthetic_dinov3_teacher(tmp_path / "teacher", grid=4)
    output = tmp_path / "run"
    result = train_distill.main(flags(tmp_path / "teacher", image_folder, output, "--num_train_epochs", 6,
                                      "--image_size", 64, "--probe_image_size", 288, "--probe_every_n_steps", 9))
    losses = result.summary["epoch_losses"]
    # From about 0.68 to 0.48, every epoch lower (the student starts far: constant-slope Euclidean ALiBi in place of
    # the RoPE).
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    student = result.model
    assert type(student).__name__ == "AlibiDinov3Model"
    assert student.config.use_alibi and not student.config.use_rope and student.config.num_register_tokens == 4
    assert not student.embeddings.mask_token.requires_grad
    history = result.summary["evaluations"]
    assert history[-1]["patch_cosine_to_teacher"] > history[0]["patch_cosine_to_teacher"]
    reloaded = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    pixel_values = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).last_hidden_state, student.eval()(pixel_values).last_hidden_state)
    assert "# ALiBi-DINOv3 (ALiBi)" in (output / "README.md").read_text()


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


def test_kill_and_resume_matches_an_unbroken_run(teacher_folder, image_folder, tmp_path, monkeypatch):
    # 10 training images, batch 4: 3 batches per epoch, so step 4 of 8 is in the middle of the second epoch.
    common = ["--max_train_steps", "8", "--random_roll", "--seed", "3"]
    unbroken = train_distill.main(flags(teacher_folder, image_folder, tmp_path / "unbroken", *common))

    interrupted = tmp_path / "interrupted"
    checkpointed = common + ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
    real_loss, calls = distillation_loss, []

    def loss_then_kill(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # during step 5, after checkpoint 4 was written
            raise Killed
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distillation, "distillation_loss", loss_then_kill)
    with pytest.raises(Killed):
        train_distill.main(flags(teacher_folder, image_folder, interrupted, *checkpointed))
    monkeypatch.setattr(distillation, "distillation_loss", real_loss)
    checkpoint_4 = training_runs.checkpoint_path(interrupted, 4)
    assert sorted(p.name for p in checkpoint_4.parent.iterdir()) == [checkpoint_4.name]  # the limit pruned 2
    assert not (interrupted / "config.json").exists()
    state = torch.load(checkpoint_4 / "custom_checkpoint_0.pkl", weights_only=True)  # the registered progress
    assert (state["global_step"], state["epoch"], state["batches_in_epoch"]) == (4, 1, 1)

    # What a kill during a later save leaves behind: a temporary folder and a folder without accelerate's state.
    temporary = checkpoint_4.parent / ".tmp_checkpoint_00000006"
    temporary.mkdir()
    (temporary / "model.safetensors").write_bytes(b"half written")
    training_runs.checkpoint_path(interrupted, 6).mkdir()
    assert training_runs.resolve_resume_checkpoint("latest", interrupted) == checkpoint_4

    resumed = train_distill.main(
        flags(teacher_folder, image_folder, interrupted, *checkpointed, "--resume_from_checkpoint", "latest")
    )
    assert resumed.summary["resumed_from"] == str(checkpoint_4)
    assert resumed.summary["global_step"] == 8 and resumed.summary["images_seen"] == unbroken.summary["images_seen"]
    difference = max_weight_difference(unbroken.model, resumed.model)
    assert difference < 1e-5, difference
    np.testing.assert_allclose(resumed.summary["epoch_losses"], unbroken.summary["epoch_losses"], rtol=1e-5)
    assert not temporary.exists()

    # A later stage starts from this output (`--init_from`): the student holds exactly its weights.
    stage2_student = build_student(str(teacher_folder), "alibi", init_from=str(interrupted))
    assert max_weight_difference(stage2_student, resumed.model) == 0


def test_streamed_dataset(teacher_folder, image_folder, tmp_path):
    """`--dataset_name` with `--streaming`; a local image folder stands in for a Hub dataset (datasets reads it
    with its imagefolder builder, offline)."""
    args = flags(teacher_folder, image_folder, tmp_path / "streamed", "--max_train_steps", 5)
    args[args.index("--train_dir")] = "--dataset_name"
    result = train_distill.main(args + ["--streaming", "--cache_teacher_embeddings", str(tmp_path / "cache")])
    summary = result.summary
    # 2 images held out for the probe; 10 streamed per epoch in batches of 4, 4, 2; 5 steps reach into epoch 2.
    assert summary["probe"]["images"] == 2 and summary["global_step"] == 5
    assert summary["images_seen"] == 4 + 4 + 2 + 4 + 4 and summary["epochs_completed"] == 1
    assert summary["teacher_forward_images"] == 10 and summary["cached_target_hits"] == 8


MODEL_FILES = {"config.json", "model.safetensors", "README.md", "configuration_alibi_dinov2.py",
               "modeling_alibi_dinov2.py", "alibi_attention.py", "preprocessor_config.json", "train_summary.json"}


@pytest.mark.multiprocess
def test_a_command_line_run_prints_no_warnings_and_keeps_the_model_folder_clean(teacher_folder, image_folder,
                                                                                 tmp_path):
    """`alibi-distill` as a user runs it: nothing on stderr says warning; the model folder holds the model files only
    (checkpoints and logs in OUTPUT_DIR-run) and the default limit keeps the newest two checkpoints."""
    output = tmp_path / "alibi"
    command = [sys.executable, "-m", "alibi_dinov2.commands", "alibi-distill"]
    command += flags(teacher_folder, image_folder, output, "--max_train_steps", 4, "--checkpointing_steps", 1,
                     "--report_to", "tensorboard")
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    finished = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    warned = [line for line in finished.stderr.splitlines() if "warn" in line.lower()]
    assert not warned, warned
    assert {path.name for path in output.iterdir()} == MODEL_FILES
    assert [path.name for path in training_runs.list_checkpoints(output)] == [
        "checkpoint_00000003", "checkpoint_00000004"]
    assert training_runs.checkpoints_root(output).parent == tmp_path / "alibi-run"
    assert any((tmp_path / "alibi-run" / training_runs.LOGS_FOLDER).rglob("events.out.tfevents.*"))


@pytest.mark.multiprocess
def test_two_processes_with_num_processes(teacher_folder, image_folder, tmp_path):
    """Two CPU processes in one gloo group, started by the command itself (`--num_processes 2`: accelerate's
    launcher with `--multi_gpu`, which torchrun runs; the script forms a CPU group when the machine has no GPU),
    with no launcher warning."""
    output = tmp_path / "two"
    command = [sys.executable, "-m", "alibi_dinov2.commands", "alibi-distill", "--num_processes", "2"]
    command += flags(teacher_folder, image_folder, output, "--per_device_train_batch_size", 2, "--max_train_steps", 4)
    command += ["--checkpointing_steps", "2", "--dataloader_num_workers", "1"]
    command += ["--cache_teacher_embeddings", str(tmp_path / "cache")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    finished = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert not [line for line in finished.stderr.splitlines() if "warn" in line.lower()], finished.stderr[-4000:]

    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["total_batch_size"] == 4
    assert summary["global_step"] == 4 and summary["images_seen"] == 16
    checkpoint = training_runs.checkpoint_path(output, 4)
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    # Both processes wrote targets; all of them count.
    shards = {p.name.split("-")[1] for p in (tmp_path / "cache").glob("*/targets-*.safetensors")}
    assert shards == {"p0", "p1"}
    assert summary["teacher_forward_images"] + summary["cached_target_hits"] == 16
    # The final folder holds the weights of the last checkpoint, which every process agreed on.
    from safetensors.torch import load_file

    final_weights = AlibiDinov2Model.from_pretrained(output).state_dict()
    checkpoint_weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(final_weights[k], checkpoint_weights[k]) for k in checkpoint_weights)


def test_unreadable_and_unusual_images_are_handled(teacher_folder, tmp_path, caplog):
    folder = tmp_path / "mixed"
    paths = write_images(folder, 5)
    (folder / "broken.png").write_bytes(paths[0].read_bytes()[:200])  # truncated PNG
    deep = (np.linspace(0, 65535, 70 * 60).reshape(70, 60)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep_gray_16bit.png")
    rgba = np.dstack([smooth_image(np.random.default_rng(1), 60, 60), np.full((60, 60), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(smooth_image(np.random.default_rng(2), 64, 64)).convert("P").save(folder / "palette.png")
    (folder / "notes.txt").write_text("not an image")

    args = flags(teacher_folder, folder, tmp_path / "out", "--num_probe_images", 0, "--per_device_train_batch_size", 3)
    result = train_distill.main(args + ["--num_train_epochs", "2"])
    summary = result.summary
    assert summary["skipped_images"] == 1
    assert summary["skipped_files"] == [str(folder / "broken.png")]
    assert summary["global_step"] == 6 and summary["images_seen"] == 2 * 8  # 9 images, 1 unreadable, twice
    assert all(np.isfinite(summary["epoch_losses"]))
    assert any("broken.png" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert any("Skipped 1 of 9 images: " in r.getMessage() for r in caplog.records)  # the final count


def test_strict_fails_on_an_unreadable_image_and_names_it(teacher_folder, tmp_path, capsys):
    folder = tmp_path / "mixed"
    paths = write_images(folder, 4)
    (folder / "broken.png").write_bytes(paths[0].read_bytes()[:200])
    args = flags(teacher_folder, folder, tmp_path / "out", "--num_probe_images", 0, "--max_train_steps", 2)
    with pytest.raises(SystemExit) as exit_info:
        run_command(train_distill.main, args + ["--strict"], prog="train_distill.py")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train_distill.py: error: ") and "broken.png" in message
    assert not (tmp_path / "out" / "config.json").exists()


def test_unreadable_and_too_small_images_become_placeholders_that_say_why(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(smooth_image(rng, 10, 30)).save(tmp_path / "tiny.png")  # less than one 14 px patch high
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.fromarray(smooth_image(rng, 40, 30)).save(tmp_path / "fine.png")
    names = ["tiny.png", "broken.png", "fine.png"]
    records = [{"image": str(tmp_path / name)} for name in names]
    samples = [DistillationImages(records, "image", 28, patch_size=14)[i] for i in range(3)]
    assert [bool(sample["valid"]) for sample in samples] == [False, False, True]
    reasons = [decode_message(sample["error"]) for sample in samples]
    assert "tiny.png" in reasons[0] and "smaller than one 14 x 14 patch" in reasons[0]
    assert "broken.png" in reasons[1] and reasons[2] == ""
    assert torch.all(samples[0]["pixel_values"] == 0) and samples[2]["pixel_values"].shape == (3, 28, 28)

    sources = [(name, str(tmp_path / name)) for name in names]
    probe = prepare_probe_images(sources, 28, 56, patch_size=14)
    assert probe.names == ["fine.png"] and probe.skipped == ["tiny.png", "broken.png"]
    with pytest.raises(ImageReadError, match="tiny.png"):
        prepare_probe_images(sources, 28, 56, patch_size=14, strict=True)


def test_a_missing_teacher_is_named_before_any_model_is_read(image_folder, tmp_path, monkeypatch):
    from alibi_dinov2.conversion import convert as conversion

    monkeypatch.setattr(conversion, "read_source", lambda *a, **k: pytest.fail("the teacher was read"))
    with pytest.raises(SourceNotFoundError, match="not found: .*no_such_teacher.pth"):
        train_distill.main(flags(tmp_path / "no_such_teacher.pth", image_folder, tmp_path / "out"))
    with pytest.raises(SourceNotFoundError, match="not found: .*no/such/stage1"):
        train_distill.main(flags(image_folder, image_folder, tmp_path / "out", "--init_from", "./no/such/stage1"))


def test_decoding_converts_every_layout_to_rgb_in_unit_range(tmp_path):
    """The project's image policy (alibi_dinov2.io.images), as the training images go through it."""
    deep = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    decoded = read_rgb01(str(tmp_path / "deep.png"))
    assert decoded.shape == (1, 4, 3) and decoded.dtype == np.float32
    # Scaled by the 16-bit range, not clipped to 8 bits: 40000 is 0.61, not 1.
    np.testing.assert_allclose(decoded[0, :, 0], deep[0] / 65535, rtol=1e-6)
    assert np.array_equal(decoded[..., 0], decoded[..., 2])
    # 12-bit data in a 16-bit container is scaled by its own range: 4095 is white.
    twelve_bit = np.array([[0, 1000, 4095]], dtype=np.uint16)
    Image.fromarray(twelve_bit).save(tmp_path / "twelve_bit.png")
    np.testing.assert_allclose(read_rgb01(tmp_path / "twelve_bit.png")[0, :, 0], twelve_bit[0] / 4095, rtol=1e-6)

    import tifffile

    colour16 = (np.random.default_rng(0).random((5, 6, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "colour16.tif", colour16)
    np.testing.assert_allclose(read_rgb01(str(tmp_path / "colour16.tif")), colour16 / 65535, rtol=1e-6)

    rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    decoded = read_rgb01((tmp_path / "rgba.png").read_bytes())
    np.testing.assert_allclose(decoded[0, 0], [1, 0, 0], atol=1e-6)
    # A transparent pixel becomes the ImageNet mean colour, i.e. 0 after normalisation.
    np.testing.assert_allclose(decoded[0, 1], IMAGENET_MEAN, atol=1e-6)

    rgb = smooth_image(np.random.default_rng(3), 8, 8)
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "palette.png")
    decoded = read_rgb01({"bytes": (tmp_path / "palette.png").read_bytes(), "path": "palette.png"})
    np.testing.assert_allclose(decoded * 255, np.asarray(palette.convert("RGB")), atol=1e-3)

    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    decoded = read_rgb01(str(tmp_path / "gray.png"))
    assert np.array_equal(decoded[..., 0], decoded[..., 1]) and decoded[0, 0, 0] == pytest.approx(rgb[0, 0, 0] / 255)

    with pytest.raises(ImageReadError, match="nothing.png"):
        read_rgb01({"bytes": b"\x89PNG\r\n\x1a\n rubbish", "path": "nothing.png"})


def test_preprocessing_resizes_the_shortest_side_and_crops_the_centre():
    image = torch.zeros(3, 100, 200)
    image[:, :, 50:150] = 1.0  # a white central square in a black 100 x 200 image
    cropped = resize_and_crop(image, 50, mode="center_crop")
    assert cropped.shape == (3, 50, 50)
    assert cropped.min() >= 0 and cropped.max() <= 1
    assert torch.allclose(cropped[:, :, 2:-2], torch.ones(3, 50, 46), atol=1e-3)  # the crop is the square
    pixel_values = preprocess_image(np.full((30, 40, 3), 255, np.uint8), 28)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert pixel_values.shape == (3, 28, 28)
    assert torch.allclose(pixel_values[:, 5, 5], expected, atol=1e-5)


# --- targets ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_teacher(tiny_kwargs):
    torch.manual_seed(0)
    config = AlibiDinov2Config(**tiny_kwargs, use_alibi=False, use_absolute_position_embeddings=True)
    return AlibiDinov2Model(config).eval().requires_grad_(False)


def keyed_batch(count: int, size: int = 56, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    pixel_values = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    keys = [torch.frombuffer(bytearray(content_key(p)), dtype=torch.uint8) for p in pixel_values]
    return pixel_values, torch.stack(keys)


def test_cached_targets_equal_live_targets_up_to_float16(tiny_teacher, tmp_path):
    pixel_values, keys = keyed_batch(6)
    valid = torch.tensor([True, True, False, True, True, True])
    live = batch_targets(tiny_teacher, pixel_values)
    fingerprint = teacher_fingerprint(tiny_teacher, 56, "no")

    cache = TeacherTargetCache(tmp_path, fingerprint)
    first = batch_targets(tiny_teacher, pixel_values, valid, keys, cache)
    assert (cache.computed, cache.hits) == (5, 0)
    cache.flush()

    calls = []
    tiny_teacher.register_forward_hook(lambda *_: calls.append(1))
    reopened = TeacherTargetCache(tmp_path, fingerprint)  # another run, same teacher
    second = batch_targets(tiny_teacher, pixel_values, valid, keys, reopened)
    assert calls == [] and (reopened.computed, reopened.hits) == (0, 5)

    readable = valid.nonzero().flatten()
    assert torch.equal(first, second)
    assert torch.equal(second[readable], live[readable].half().float())
    torch.testing.assert_close(second[readable], live[readable], rtol=1e-3, atol=1e-3)
    assert torch.all(second[2] == 0)  # the unreadable image got no target

    # Another teacher (or size, or precision) gets another folder: stale targets are never reused.
    with torch.no_grad():
        tiny_teacher.layernorm.bias.add_(0.1)
    assert teacher_fingerprint(tiny_teacher, 56, "no") != fingerprint
    in_bf16 = teacher_fingerprint(tiny_teacher, 56, "bf16")
    assert in_bf16 != teacher_fingerprint(tiny_teacher, 56, "no")


def test_a_second_cached_run_never_runs_the_teacher(teacher_folder, image_folder, tmp_path):
    cache_args = ["--num_train_epochs", 2, "--cache_teacher_embeddings", tmp_path / "cache", "--num_probe_images", 0]
    first = train_distill.main(flags(teacher_folder, image_folder, tmp_path / "first", *cache_args)).summary
    second = train_distill.main(flags(teacher_folder, image_folder, tmp_path / "second", *cache_args)).summary
    assert (first["teacher_forward_images"], first["cached_target_hits"]) == (12, 12)  # computed once, then read
    assert (second["teacher_forward_images"], second["cached_target_hits"]) == (0, 24)
    assert second["epoch_losses"] == first["epoch_losses"]


def test_channel_blanking_zeroes_exactly_the_listed_channels(tiny_teacher, tmp_path):
    pixel_values, keys = keyed_batch(3)
    reference = batch_targets(tiny_teacher, pixel_values)
    listed = [1, 5, 30]
    others = [c for c in range(32) if c not in listed]
    for cache in (None, TeacherTargetCache(tmp_path, "fingerprint")):
        blanked = batch_targets(tiny_teacher, pixel_values, None, keys, cache, blank_channels=listed)
        expected = reference if cache is None else reference.half().float()
        assert torch.all(blanked[..., listed] == 0)
        assert torch.equal(blanked[..., others], expected[..., others])
        assert torch.all(expected[..., listed] != 0)
    # The teacher itself is untouched.
    assert torch.equal(batch_targets(tiny_teacher, pixel_values), reference)


def test_auto_blanking_picks_the_most_positional_channels(monkeypatch):
    from evaluation import distillation_probe

    height = width = 24
    y, x = np.mgrid[0:height, 0:width] / (height - 1)
    radial = np.hypot(y - 0.5, x - 0.5)

    def synthetic_features(model, image, image_processor=None, layers="last"):
        features = np.random.default_rng(int(image.sum() * 1000) % 2**32).normal(size=(height, width, 16))
        features[..., 2] = x + 0.01 * features[..., 2]  # left-right ramp
        features[..., 9] = y + 0.01 * features[..., 9]  # up-down ramp
        features[..., 11] = radial + 0.01 * features[..., 11]  # radial
        features[..., 5] = x + y + 0.5 * features[..., 5]  # diagonal, noisier
        return features

    monkeypatch.setattr(distillation_probe, "extract_patch_features", synthetic_features)
    images = [np.random.default_rng(seed).random((336, 336, 3)) for seed in range(3)]
    scores = DistillationProbe().channel_scores(None, images)
    assert scores.shape == (16,)
    assert sorted(most_positional_channels(scores, AUTO_BLANK_CHANNEL_COUNT)) == [2, 5, 9, 11]
    assert min(scores[[2, 9, 11]]) > 0.9 and max(np.delete(scores, [2, 5, 9, 11])) < 0.5


def test_random_roll_moves_image_and_target_together():
    patch, grid = 14, (3, 4)
    # Every patch of image i is filled with its patch index; the target's channel 0 holds the same index.
    index_map = torch.arange(12, dtype=torch.float32).reshape(grid)
    image = index_map.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    pixel_values = torch.stack([image.expand(3, -1, -1), 100 + image.expand(3, -1, -1)])
    targets = torch.stack([index_map.flatten(), 100 + index_map.flatten()])[..., None].repeat(1, 1, 5)
    shifts = random_patch_shifts(2, grid, torch.Generator().manual_seed(1))
    assert shifts.shape == (2, 2) and (shifts[:, 0] < 3).all() and (shifts[:, 1] < 4).all()
    shifts = torch.tensor([[1, 3], [2, 1]])
    rolled_images, rolled_targets = roll_by_patches(pixel_values, targets, shifts, patch)
    for i in range(2):
        patch_values = rolled_images[i, 0, ::patch, ::patch].flatten()  # top-left pixel of every patch
        assert torch.equal(patch_values, rolled_targets[i, :, 0])
        expected = torch.roll(targets[i, :, 0].reshape(grid), tuple(shifts[i].tolist()), dims=(0, 1))
        assert torch.equal(rolled_targets[i, :, 0].reshape(grid), expected)
    assert not torch.equal(rolled_targets, targets)


def test_loss_is_one_minus_cosine_per_token_and_ignores_unreadable_images():
    student = torch.randn(3, 5, 8)
    assert distillation_loss(student, 2.5 * student).item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(student, -student).item() == pytest.approx(2, abs=1e-6)
    target = torch.randn(3, 5, 8)
    expected = (1 - torch.nn.functional.cosine_similarity(student, target, dim=-1)).mean()
    assert distillation_loss(student, target).item() == pytest.approx(expected.item(), rel=1e-6)
    mask = torch.tensor([True, False, True])
    garbage = target.clone()
    garbage[1] = -student[1]
    masked = distillation_loss(student, garbage, mask)
    expected = (1 - torch.nn.functional.cosine_similarity(student[mask], target[mask], dim=-1)).mean()
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(student, target, kind="mse").item() == pytest.approx(
        (student - target).pow(2).mean().item(), rel=1e-6
    )


# --- command line ----------------------------------------------------------------------------------------------------

EVERY_FLAG = [
    "--teacher", "--variant", "--init_from", "--train_dir", "--dataset_name", "--dataset_config_name",
    "--train_split", "--image_column", "--streaming", "--max_train_samples", "--image_size",
    "--dataloader_num_workers", "--strict", "--blank_channels", "--loss", "--random_roll",
    "--cache_teacher_embeddings",
    "--per_device_train_batch_size", "--gradient_accumulation_steps", "--num_train_epochs", "--max_train_steps",
    "--learning_rate", "--weight_decay", "--lr_scheduler", "--num_warmup_steps", "--mixed_precision", "--seed",
    "--output_dir", "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint", "--report_to",
    "--logging_steps", "--push_to_hub", "--hub_model_id", "--probe_dir", "--num_probe_images",
    "--probe_every_n_steps", "--probe_image_size", "--cpu", "--hub_private_repo", "--num_processes",
]  # fmt: skip


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_distill.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in EVERY_FLAG:
        assert flag in text, flag
    assert "CONFIG_FILE" in text and "accelerate launch" in text
    documented = {a.option_strings[0] for a in train_distill.build_parser()._actions if a.option_strings}
    assert documented - {"-h"} == set(EVERY_FLAG)
    # One flag style: each option is shown once, with underscores.
    assert "--output-dir" not in text and "--no-" not in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variant", "learned"], "argument --variant: invalid choice: 'learned'"),
        (["--blank_channels", "47", "x"], "--blank_channels takes channel indices, `auto` or `none`"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps must be a positive integer or `epoch`"),
        (["--image_size", "0"], "--image_size must be a positive integer"),
        (
            ["--dataset_name", "someone/images"],
            "exactly one of --train_dir FOLDER or --dataset_name HUB_DATASET (both",
        ),
        (["--num_probe_images", "0", "--blank_channels", "auto"], "--blank_channels auto ranks channels on held-out"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "is not a folder (or use `latest`)"),
    ],
)
def test_bad_flag_values_exit_with_a_clear_message(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_distill.parse_args(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_source_and_output_dir_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_distill.parse_args(["--output_dir", str(tmp_path)])
    expected = "exactly one of --train_dir FOLDER or --dataset_name HUB_DATASET (neither was given)"
    assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_distill.parse_args(["--train_dir", str(tmp_path)])
    assert "--output_dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_distill.parse_args(["--dataset_name", "someone/images", "--output_dir", "o", "--streaming"])
    assert "--streaming needs --max_train_steps" in capsys.readouterr().err


def test_sizes_that_do_not_fit_the_patch_grid_are_refused(teacher_folder, image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"--image_size 10 is smaller than one 14 x 14 patch"):
        train_distill.main(flags(teacher_folder, image_folder, tmp_path / "a", "--image_size", 10))
    with pytest.raises(ValueError, match=r"needs --image_size to be a multiple of 14; got 60 \(use 56 or 70\)"):
        train_distill.main(flags(teacher_folder, image_folder, tmp_path / "b", "--image_size", 60, "--random_roll"))


def test_config_files_are_overridden_by_the_command_line(tmp_path, capsys):
    config = {
        "_comment": "ignored",
        "train_dir": str(tmp_path),
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 3e-4,
        "blank_channels": [359, 47],
        "random_roll": True,
        "checkpointing_steps": "epoch",
    }
    json_file = tmp_path / "stage.json"
    json_file.write_text(json.dumps(config))
    args = train_distill.parse_args([str(json_file), "--learning_rate", "5e-5", "--random_roll", "false"])
    assert args.learning_rate == 5e-5 and args.random_roll is False
    assert args.blank_channels == [47, 359] and args.checkpointing_steps == "epoch" and args.config == str(json_file)

    yaml_file = tmp_path / "stage.yaml"
    yaml_file.write_text("train_dir: %s\noutput_dir: out\nvariant: nope\nblank_channels: auto\n" % tmp_path)
    args = train_distill.parse_args([str(yaml_file), "--blank_channels", "none"])
    assert args.variant == "nope" and args.blank_channels == []

    yaml_file.write_text("train_dir: %s\noutput_dir: out\nlearning_rat: 0.1\n" % tmp_path)
    with pytest.raises(SystemExit):
        train_distill.parse_args([str(yaml_file)])
    assert "unknown option(s) in" in (err := capsys.readouterr().err) and "did you mean 'learning_rate'?" in err


def test_shipped_stage_configs_follow_the_reference_recipe():
    stage1 = train_distill.parse_args([str(REPO_ROOT / "configs" / "distill_stage1_224.json")])
    stage2 = train_distill.parse_args([str(REPO_ROOT / "configs" / "distill_stage2_518.json")])
    recipe = lambda a: (a.image_size, a.per_device_train_batch_size, a.learning_rate, a.num_train_epochs)  # noqa: E731
    assert recipe(stage1) == (224, 256, 1e-4, 15)
    assert recipe(stage2) == (518, 32, 1e-5, 5)
    for args in (stage1, stage2):
        assert args.teacher == "facebook/dinov2-with-registers-small" and args.variant == "alibi"
        assert (args.weight_decay, args.lr_scheduler, args.loss) == (0.01, "constant", "cosine")
        assert args.blank_channels == [47, 113, 117, 359] and args.dataset_name
    assert stage2.init_from == stage1.output_dir and stage1.init_from is None


def test_push_to_hub_uploads_the_final_folder_privately_when_asked(
    teacher_folder, image_folder, tmp_path, monkeypatch
):
    from alibi_dinov2.training import distillation

    pushed = []
    monkeypatch.setattr(distillation, "push_to_hub", lambda folder, repo_id, **options: pushed.append(
        (Path(folder), repo_id, options["private"])))
    output = tmp_path / "alibi-run"
    result = train_distill.main(flags(teacher_folder, image_folder, output, "--max_train_steps", 1,
                                      "--num_probe_images", 0, "--push_to_hub", "--hub_private_repo"))
    assert pushed == [(output, "alibi-run", True)] and (result.output_dir / "config.json").is_file()


def test_a_run_with_probe_images_needs_a_monitor_before_any_model_loads(image_folder, tmp_path):
    from alibi_dinov2.training import distillation

    # The teacher does not exist: the missing monitor is reported first, before any loading.
    arguments = train_distill.parse_args(flags(tmp_path / "no_such_teacher", image_folder, tmp_path / "out"))
    with pytest.raises(ValueError, match="needs a monitor"):
        distillation.train(arguments)
    assert not (tmp_path / "out").exists()
