"""Probe runner: image sources, runs over models x images, JSON and the command line (all offline)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from alibi_dinov2.features.extraction import extract_patch_features
from alibi_dinov2.features.preprocessing import image_statistics, load_image_processor
from alibi_dinov2.hub.models import load_model
from alibi_dinov2.io.image_sets import load_image_source, noise_images, texture_images
from evaluation.distillation_probe import DistillationProbe
from evaluation.positional_probe import PROBE_PROTOCOL, ProbeProtocol, make_ramp
from evaluation.probe_runner import format_table, main, run_probe


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)


def positional_model():
    """Tiny DINOv2 whose position embedding encodes lr and ud on a 12 x 12 grid.

    Each ramp is an angle on a circle (cos, sin) of radius 10, so that the per-token LayerNorms do not
    wash the position out; the patch content of noise images is small next to it.
    """
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY, image_size=168)).eval()
    with torch.no_grad():
        embedding = model.embeddings.position_embeddings
        embedding.zero_()
        for index, ramp in enumerate(("lr", "ud")):
            angle = torch.tensor(make_ramp(ramp, 12, 12).ravel() * np.pi / 2, dtype=torch.float32)
            embedding[0, 1:, 2 * index] = 10 * torch.cos(angle)
            embedding[0, 1:, 2 * index + 1] = 10 * torch.sin(angle)
    return model


def alibi_model():
    import configuration_alibi_dinov2 as configuration
    import modeling_alibi_dinov2 as modeling

    torch.manual_seed(0)
    config = configuration.AlibiDinov2Config(**TINY, image_size=168, num_register_tokens=4)
    return modeling.AlibiDinov2Model(config).eval()


def test_builtin_sources():
    textures = texture_images()
    assert [name for name, _ in textures] == ["brick", "grass", "gravel"]
    assert all(image.shape == (512, 512) and image.dtype == np.uint8 for _, image in textures)
    noise = load_image_source("noise:2", size=(30, 44))
    assert len(noise) == 2 and noise[0][1].shape == (30, 44, 3) and noise[0][1].dtype == np.float32
    assert 0 <= noise[0][1].min() and noise[0][1].max() < 1
    np.testing.assert_array_equal(noise[1][1], noise_images(2, size=(30, 44))[1][1])
    assert not np.array_equal(noise[0][1], noise[1][1])
    assert len(load_image_source("noise", size=(14, 14), limit=3)) == 3
    with pytest.raises(ValueError, match="Unknown image source"):
        load_image_source("not-a-source")


def test_micro_source_is_homogeneous_synthetic_microstructure():
    micro = load_image_source("micro:2", size=(42, 56))
    assert [name for name, _ in micro] == ["micro_00", "micro_01"]
    assert micro[0][1].shape == (42, 56) and micro[0][1].dtype == np.float32
    assert 0.0 <= micro[0][1].min() and micro[0][1].max() <= 1.0


def test_folder_and_saved_dataset_sources(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((30, 40), 7, dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((28, 28, 4), 9, dtype=np.uint8)).save(folder / "b.png")  # RGBA
    (folder / "notes.txt").write_text("not an image")
    images = load_image_source(str(folder))
    assert [name for name, _ in images] == ["a.png", "b.png"]
    # Read by the one image policy: RGB in [0, 1], gray replicated, alpha composited onto the ImageNet mean.
    assert images[0][1].shape == (30, 40, 3) and images[1][1].shape == (28, 28, 3)
    np.testing.assert_allclose(images[0][1], 7 / 255)
    alpha = 9 / 255
    np.testing.assert_allclose(
        images[1][1][0, 0], alpha * 9 / 255 + (1 - alpha) * np.array([0.485, 0.456, 0.406]), rtol=1e-5
    )

    datasets = pytest.importorskip("datasets")
    pictures = [Image.fromarray(np.full((20, 24), value, dtype=np.uint8)) for value in (1, 2, 3)]
    dataset = datasets.Dataset.from_dict(
        {"picture": pictures}, features=datasets.Features({"picture": datasets.Image()})
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    loaded = load_image_source(str(tmp_path / "saved"), limit=2)
    assert len(loaded) == 2 and loaded[1][1].shape == (20, 24, 3)
    np.testing.assert_allclose(loaded[1][1], 2 / 255)


def test_each_score_is_the_protocols_sampling_of_that_image_and_repeat():
    model = positional_model()
    images = noise_images(3, size=(168, 140))
    protocol = ProbeProtocol(step=3, repeats=2, seed=4)
    results = run_probe({"m": model}, {"noise": images}, ramps=("lr+ud",), protocol=protocol, progress=False)
    expected = [[protocol.linear_probe(extract_patch_features(model, image), "lr+ud", index, repeat)
                 for repeat in range(2)] for index, (_, image) in enumerate(images)]
    np.testing.assert_allclose(results["scores"]["m"]["noise"]["lr+ud"]["per_image"], expected, rtol=1e-12)
    assert ProbeProtocol.from_dict(results["protocol"]) == protocol
    assert results["protocol"]["ramps"] == ["lr+ud"] and results["protocol"]["score"] == "R^2 over all patches"


def test_the_r2_a_distillation_run_logs_is_the_one_alibi_probe_computes():
    """Same images, same model: the distillation monitor's R^2 equals the probe runner's lr+ud mean."""
    model = positional_model()
    images = noise_images(2, size=(266, 266))  # 19 x 19 patches: 10 samples at step 6, the protocol's minimum
    results = run_probe({"m": model}, {"noise": images}, ramps=("lr+ud",), progress=False)
    assert results["scores"]["m"]["noise"]["lr+ud"]["n"] == 2 * PROBE_PROTOCOL.repeats
    logged = DistillationProbe().r2(model, [image for _, image in images])
    assert logged == pytest.approx(results["scores"]["m"]["noise"]["lr+ud"]["mean"], rel=1e-12, abs=1e-12)
    assert logged > 0.3  # about 0.48: the planted 12 x 12 positions, interpolated to 19 x 19


def test_run_probe_finds_planted_positions_and_random_control_is_zero():
    models = {"positional": positional_model(), "alibi": alibi_model()}
    sources = {"noise": noise_images(2, size=(168, 168))}
    results = run_probe(
        models, sources, ramps=("lr+ud", "random"), protocol=ProbeProtocol(step=2, repeats=2), per_channel=True,
        progress=False,
    )
    scores = results["scores"]
    assert scores["positional"]["noise"]["lr+ud"]["mean"] > 0.85
    # Wrapped ALiBi is equivariant to whole-patch rolls: nothing in its features marks absolute position.
    assert scores["alibi"]["noise"]["lr+ud"]["mean"] < 0.1
    for name in models:
        random_control = scores[name]["noise"]["random"]
        assert random_control["n"] == 4 and len(random_control["per_image"]) == 2
        assert random_control["mean"] < 0.1
    assert results["grids"]["alibi"]["noise"] == [[12, 12], [12, 12]]
    assert results["models"]["alibi"]["prefix_tokens"] == 5
    channel_scores = np.array(results["per_channel"]["positional"]["noise"]["lr+ud"])
    assert channel_scores.shape == (32,)
    json.dumps(results)  # JSON-ready
    table = format_table(results)
    assert "positional" in table and "alibi" in table and "+-" in table


def test_command_line_writes_json(tmp_path, capsys):
    torch.manual_seed(0)
    folder = tmp_path / "tiny-dinov2"
    Dinov2Model(Dinov2Config(**TINY, image_size=56)).save_pretrained(folder)
    output = tmp_path / "out" / "probe.json"
    main(
        [
            "--models", str(folder),
            "--images", "noise:2",
            "--size", "84", "98",
            "--ramps", "lr+ud", "random",
            "--step", "2",
            "--repeats", "3",
            "--names", "tiny",
            "--output_dir", str(output.parent),
            "--no-progress",
        ]
    )
    written = json.loads(output.read_text())
    summary = written["scores"]["tiny"]["noise:2"]
    assert summary["lr+ud"]["n"] == 6 and summary["random"]["n"] == 6
    assert written["grids"]["tiny"]["noise:2"] == [[6, 7], [6, 7]]
    assert written["protocol"]["step"] == 2
    assert "lr+ud" in capsys.readouterr().out


def test_small_grids_are_left_out_of_the_means_with_a_warning(caplog):
    models = {"positional": positional_model()}
    large = noise_images(2, size=(168, 168))  # 12 x 12 patches: 16 samples at step 3
    small = [("small", np.random.default_rng(1).random((56, 56, 3), dtype=np.float32))]  # 4 x 4: 1 sample
    mixed = run_probe(models, {"mixed": large + small}, ramps=("lr+ud",), protocol=ProbeProtocol(step=3, repeats=2),
                      per_channel=True, progress=False)
    alone = run_probe(models, {"mixed": large}, ramps=("lr+ud",), protocol=ProbeProtocol(step=3, repeats=2),
                      per_channel=True, progress=False)
    assert (
        mixed["scores"]["positional"]["mixed"]["lr+ud"]["mean"]
        == alone["scores"]["positional"]["mixed"]["lr+ud"]["mean"]
    )
    assert mixed["scores"]["positional"]["mixed"]["lr+ud"]["n"] == 4
    np.testing.assert_array_equal(mixed["per_channel"]["positional"]["mixed"]["lr+ud"],
                                  alone["per_channel"]["positional"]["mixed"]["lr+ud"])
    (warning,) = mixed["warnings"]
    assert warning["image"] == "small" and warning["samples"] == 1 and "left out" in warning["message"]
    assert "mixed/small" in caplog.text and alone["warnings"] == []
    only_small = run_probe(models, {"small": small}, ramps=("lr+ud",), protocol=ProbeProtocol(step=3, repeats=1),
                           progress=False)
    assert np.isnan(only_small["scores"]["positional"]["small"]["lr+ud"]["mean"])


# What transformers saves for a DINOv3 image processor, here with the statistics of Meta's satellite DINOv3 models;
# building its class needs torchvision, so the statistics are read from the file where torchvision is missing.
DINOV3_PREPROCESSOR = {
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.430, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143],
}


def test_dinov3_folders_load_and_are_probed(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from conftest import TINY_DINOV3, tiny_alibi_model

    tiny_alibi_model("alibi_dinov3").save_pretrained(tmp_path / "alibi-dinov3")
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3, num_register_tokens=4)).save_pretrained(tmp_path / "dinov3")
    (tmp_path / "dinov3" / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR))
    (alibi, alibi_stats), (stock, stock_stats) = (
        load_model(str(tmp_path / name)) for name in ("alibi-dinov3", "dinov3")
    )
    assert type(alibi).__name__ == "AlibiDinov3Model" and type(stock) is DINOv3ViTModel
    assert alibi_stats is None  # no processor stored: ImageNet statistics
    np.testing.assert_allclose(stock_stats["image_mean"], DINOV3_PREPROCESSOR["image_mean"], rtol=1e-6)
    np.testing.assert_allclose(stock_stats["image_std"], DINOV3_PREPROCESSOR["image_std"], rtol=1e-6)
    for name, stats in ((tmp_path / "dinov3", stock_stats), (tmp_path / "alibi-dinov3", {})):
        mean, std = image_statistics(load_image_processor(str(name)))
        np.testing.assert_allclose(mean, stats.get("image_mean", (0.485, 0.456, 0.406)), rtol=1e-6)
        np.testing.assert_allclose(std, stats.get("image_std", (0.229, 0.224, 0.225)), rtol=1e-6)
    results = run_probe({"alibi": alibi, "stock": stock}, {"noise": noise_images(2, size=(192, 200))},
                        ramps=("lr+ud", "random"), protocol=ProbeProtocol(step=2, repeats=2),
                        image_processors={"stock": stock_stats},
                        progress=False)
    for name in ("alibi", "stock"):
        assert results["models"][name]["patch_size"] == 16 and results["models"][name]["prefix_tokens"] == 5
        assert results["grids"][name]["noise"] == [[12, 12], [12, 12]]
    # Wrapped ALiBi without RoPE is equivariant to whole-patch rolls: nothing marks absolute position.
    assert results["scores"]["alibi"]["noise"]["lr+ud"]["mean"] < 0.1


def test_a_bad_protocol_option_is_refused_naming_it_before_any_model_loads(capsys):
    with pytest.raises(SystemExit):
        main(["--models", "no/such-model", "--step", "0"])
    assert "error: --step must be >= 1, got 0" in capsys.readouterr().err
