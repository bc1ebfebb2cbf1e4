"""The quickstart in a reduced mode: the synthetic teacher leaks position, the distilled ALiBi student does not."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import quickstart
from evaluation.positional_probe import linear_probe


def test_synthetic_position_embedding_is_smooth_ramps():
    embedding = quickstart.smooth_position_embedding(grid=6, hidden_size=16, amplitude=2.0)
    assert embedding.shape == (1, 37, 16)
    assert torch.count_nonzero(embedding[0, 0]) == 0 and torch.count_nonzero(embedding[0, 1:, 8:]) == 0
    # Channel 0 is a cosine of the left-right ramp alone: constant down each column, monotonic along a row.
    grid = embedding[0, 1:, 0].reshape(6, 6)
    assert torch.allclose(grid, grid[:1].expand(6, 6))
    assert (grid[0, 1:] < grid[0, :-1]).all()
    probe_r2 = linear_probe(embedding[0, 1:, :8].reshape(6, 6, 8).numpy(), ramp="lr+ud", step=1, seed=0)
    assert probe_r2 > 0.99


def test_options_come_from_a_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "quick.json"
    config.write_text(json.dumps({"max_train_steps": 3, "variants": ["alibi"], "train_dir": str(tmp_path)}))
    args = quickstart.parse_args([str(config), "--seed", "5"])
    assert (args.max_train_steps, args.variants, args.seed) == (3, ["alibi"], 5)
    assert args.train_dir == tmp_path and args.output_dir == Path("outputs/quickstart")
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--variants", "learned"])
    assert "invalid choice: 'learned'" in capsys.readouterr().err


def test_reduced_quickstart_shows_the_effect(tmp_path):
    report = quickstart.main([
        "--output_dir", str(tmp_path),
        "--num_train_images", "24",
        "--num_probe_images", "2",
        "--probe_image_size", "364",
        "--max_train_steps", "12",
        "--per_device_train_batch_size", "8",
        "--variants", "alibi",
        "--repeats", "2",
    ])
    summary = report["summary"]
    assert summary["teacher"]["held-out"]["lr+ud"]["mean"] >= 0.8
    assert summary["alibi"]["held-out"]["lr+ud"]["mean"] <= 0.1
    assert summary["teacher"]["noise"]["lr+ud"]["mean"] > summary["alibi"]["noise"]["lr+ud"]["mean"] + 0.5
    cosine = report["student_cosine_to_teacher"]["alibi"]
    assert cosine["last"] > cosine["first"]
    assert all(report["acceptance"].values()), report["acceptance"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["acceptance"] == report["acceptance"]
    page = (tmp_path / "report.html").read_text()
    assert "SYNTHETIC TEACHER" in page
    assert (tmp_path / "teacher-synthetic" / "README.md").read_text().count("SYNTHETIC") == 1
    assert (tmp_path / "student-alibi" / "model.safetensors").exists()
