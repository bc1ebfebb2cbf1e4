"""The quickstart in a reduced mode: the synthetic teacher leaks position, the distilled students do not, and the
ALiBi student keeps the teacher's neighbourhood better than the NoPE student."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import alibi_dinov2.synthetic.teachers as synthetic_teachers
import quickstart
from evaluation.positional_probe import linear_probe


def neighbourhood_shifts(model, pixels, patch, generator):
    """How much each patch token of `model` (4 registers) moves, relative to its norm and averaged over the batch,
    when the patch at row 3, column 3 is redrawn: the `(grid, grid)` map and its mean over that patch's 4
    neighbours."""
    grid = pixels.shape[-1] // patch
    changed = pixels.clone()
    changed[..., 3 * patch : 4 * patch, 3 * patch : 4 * patch] = torch.randn(4, 3, patch, patch, generator=generator)
    with torch.no_grad():
        before, after = (model(pixel_values=x).last_hidden_state[:, 5:] for x in (pixels, changed))
    shift = ((after - before).norm(dim=-1) / before.norm(dim=-1)).mean(0).reshape(grid, grid)
    return shift, torch.stack([shift[2, 3], shift[4, 3], shift[3, 2], shift[3, 4]]).mean()


def test_synthetic_position_embedding_is_smooth_ramps():
    embedding = synthetic_teachers.smooth_position_embedding(grid=6, hidden_size=16, amplitude=2.0)
    assert embedding.shape == (1, 37, 16)
    assert torch.count_nonzero(embedding[0, 0]) == 0 and torch.count_nonzero(embedding[0, 1:, 8:]) == 0
    # Channel 0 is a cosine of the left-right ramp alone: constant down each column, monotonic along a row.
    grid = embedding[0, 1:, 0].reshape(6, 6)
    assert torch.allclose(grid, grid[:1].expand(6, 6))
    assert (grid[0, 1:] < grid[0, :-1]).all()
    probe_r2 = linear_probe(embedding[0, 1:, :8].reshape(6, 6, 8).numpy(), ramp="lr+ud", step=1, seed=0)
    assert probe_r2 > 0.99


def test_synthetic_teacher_attends_to_each_patch_neighbourhood(tmp_path):
    from alibi_dinov2.conversion.convert import convert

    built = synthetic_teachers.build_synthetic_teacher(tmp_path / "teacher", seed=0)
    teacher = convert(str(tmp_path / "teacher"), variant="keep-pe")  # what distillation and the report read
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 112, 112, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(teacher(pixel_values=pixels).last_hidden_state,
                                   built(pixel_values=pixels).last_hidden_state)
    # Change the patch at row 3, column 3 of the 8 x 8 grid: its neighbours' features move, far patches' barely.
    shift, neighbours = neighbourhood_shifts(teacher, pixels, 14, generator)
    assert neighbours > 0.1  # about 0.3
    assert shift[7, 7] < 0.05 * neighbours  # (wrapped) Manhattan distance 8: about 0.001
    # Its attention logits are a cosine series close to ALiBi's -slope * |u| along each axis (u = offset / grid).
    slope, u = synthetic_teachers.TEACHER_SLOPE, np.arange(5) / 8
    series = sum(a * (np.cos(2 * np.pi * k * u) - 1) for a, k in
                 zip(synthetic_teachers.distance_bias_coefficients(slope), synthetic_teachers.TEACHER_HARMONICS))
    np.testing.assert_allclose(series, -slope * u, atol=0.05 * slope)


def test_synthetic_dinov3_teacher_leaks_position_and_attends_to_each_patch_neighbourhood(tmp_path):
    """A random DINOv3 leaks nothing (lr+ud R^2 about -1 on these images); the wired one leaks through its RoPE
    alone (about 0.9) and, like the DINOv2 teacher, mixes each patch with its neighbours only."""
    from transformers import DINOv3ViTModel

    from alibi_dinov2.features.extraction import extract_patch_features

    teacher = synthetic_teachers.build_synthetic_dinov3_teacher(tmp_path / "teacher", seed=0)
    random = DINOv3ViTModel(teacher.config).eval()
    assert DINOv3ViTModel.from_pretrained(tmp_path / "teacher").config.num_register_tokens == 4
    images = [np.stack([image] * 3, axis=-1) for image in quickstart.generated_images(2, 512, seed=1)]

    def r2(model):
        return np.mean([linear_probe(extract_patch_features(model, image), ramp="lr+ud", step=6, seed=seed)
                        for image in images for seed in range(2)])

    assert r2(teacher) > 0.8 and r2(random) < 0
    generator = torch.Generator().manual_seed(0)
    shift, neighbours = neighbourhood_shifts(teacher, torch.randn(4, 3, 112, 112, generator=generator), 16, generator)
    assert neighbours > 0.1  # about 0.27
    assert shift[0, 0] < 0.05 * neighbours and shift[6, 6] < 0.05 * neighbours  # Manhattan distance 6: about 0.001


def test_options_come_from_a_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "quick.json"
    config.write_text(json.dumps({"max_train_steps": 3, "variants": ["alibi"], "train_dir": str(tmp_path)}))
    args = quickstart.parse_args([str(config), "--seed", "5"])
    assert (args.max_train_steps, args.variants, args.seed) == (3, ["alibi"], 5)
    assert args.train_dir == tmp_path and args.output_dir == Path("outputs/quickstart")
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--variants", "learned"])
    assert "invalid choice: 'learned'" in capsys.readouterr().err


@pytest.mark.slow
def test_reduced_quickstart_shows_the_effect(tmp_path):
    report = quickstart.main([
        "--output_dir", str(tmp_path),
        "--num_train_images", "24",
        "--num_probe_images", "2",
        "--probe_image_size", "364",
        "--max_train_steps", "12",
        "--per_device_train_batch_size", "8",
        "--variants", "alibi", "nope",
        "--repeats", "2",
    ])
    summary = report["summary"]
    assert summary["teacher"]["held-out"]["lr+ud"]["mean"] >= 0.8
    assert summary["alibi"]["held-out"]["lr+ud"]["mean"] <= 0.1
    assert summary["nope"]["held-out"]["lr+ud"]["mean"] < 0.1
    assert summary["teacher"]["noise"]["lr+ud"]["mean"] > summary["alibi"]["noise"]["lr+ud"]["mean"] + 0.5
    cosine = report["student_cosine_to_teacher"]["alibi"]
    assert cosine["last"] > cosine["first"]
    # The neighbourhood: ALiBi keeps more of the teacher than NoPE, held out (measured 0.976 vs 0.767 here) and in
    # the report's headline (0.92 vs 0.76, native size, unblanked teacher).
    margin = 0.05
    nope = report["student_cosine_to_teacher"]["nope"]
    assert cosine["last"] > nope["last"] + margin, (cosine, nope)
    headline = report["headline"]
    assert headline["alibi"]["cosine_to_reference"] > headline["nope"]["cosine_to_reference"] + margin
    assert all(report["acceptance"].values()), report["acceptance"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["acceptance"] == report["acceptance"]
    page = (tmp_path / "report.html").read_text()
    assert "SYNTHETIC TEACHER" in page
    # One patch cosine to the teacher, named by its images, in the headline, the page, the JSON and the checks.
    assert report["cosine_images"] == {"set": "held-out", "images": 2}
    for variant in ("alibi", "nope"):
        quoted = f"patch cosine to teacher {headline[variant]['cosine_to_reference']:.2f} on the 2 images of held-out"
        assert quoted in headline[variant]["sentence"] and quoted in page
        assert on_disk["cosine_to_reference"][variant] == headline[variant]["cosine_to_reference"]
    assert any("on the 2 images of held-out (margin" in check for check in report["acceptance"])
    assert "compare their patch cosines to the teacher in the headline" in page
    # The training run's monitor is another measurement: it is named wherever it is quoted.
    assert "2 held-out images centre-cropped to 112 px" in report["student_cosine_to_teacher_measured_by"]
    card = (tmp_path / "student-alibi" / "README.md").read_text()
    assert "patch cosine to teacher target, held-out, 112 px" in card
    assert (tmp_path / "teacher-synthetic" / "README.md").read_text().count("SYNTHETIC") == 1
    assert (tmp_path / "student-alibi" / "model.safetensors").exists()
    assert (tmp_path / "student-nope" / "model.safetensors").exists()


@pytest.mark.slow
def test_reduced_quickstart_with_a_dinov3_teacher_shows_the_effect(tmp_path):
    report = quickstart.main([
        "--teacher_arch", "dinov3",
        "--output_dir", str(tmp_path),
        "--num_train_images", "24",
        "--num_probe_images", "2",
        "--probe_image_size", "512",  # a 32 x 32 grid: the probe samples 28 patches
        "--max_train_steps", "6",
        "--per_device_train_batch_size", "8",
        "--repeats", "2",
    ])
    summary = report["summary"]
    assert summary["teacher"]["held-out"]["lr+ud"]["mean"] >= 0.8
    assert summary["alibi"]["held-out"]["lr+ud"]["mean"] <= 0.1
    assert summary["nope"]["held-out"]["lr+ud"]["mean"] <= 0.1
    alibi, nope = (report["student_cosine_to_teacher"][variant]["last"] for variant in ("alibi", "nope"))
    # The ALiBi student starts at about 0.998 (its bias imitates the teacher's RoPE attention; the ramps are blanked).
    assert alibi > nope + 0.05, (alibi, nope)
    assert "SYNTHETIC TEACHER: a small DINOv3" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "student-alibi" / "config.json").read_text().count('"alibi_dinov3"') == 1
