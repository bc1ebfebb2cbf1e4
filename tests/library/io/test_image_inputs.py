"""Every entry point that reads images reads the same awkward files the same way, and skips the same bad ones."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from alibi_dinov2.features.extraction import extract_patch_features, image_to_pixel_values
from alibi_dinov2.features.preprocessing import to_pixel_values
from alibi_dinov2.features.visualisation import side_by_side
from alibi_dinov2.io.image_sets import folder_images
from alibi_dinov2.io.images import (
    ImageReadError,
    ImageTooSmallError,
    SkippedInputs,
    load_image,
    read_rgb01,
    to_rgb01,
    unsigned_range,
)
from awkward_images import CORRUPT, READABLE, SIZE, TINY, write_awkward_images
from conftest import REPO_ROOT
from demo.app import prepare_image, read_upload
from evaluation import probe_runner, report, scribble_benchmark


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    return write_awkward_images(tmp_path_factory.mktemp("awkward"))


@pytest.fixture(scope="module")
def reference(awkward):
    """What the one image module makes of each readable file: (H, W, 3) float32 in [0, 1]."""
    return {name: read_rgb01(awkward / name) for name in READABLE}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved stock DINOv2 with registers (patch 14), for the commands."""
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                                       image_size=56, num_register_tokens=2)
    folder = tmp_path_factory.mktemp("model")
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# The policy itself
# --------------------------------------------------------------------------------------------------
def test_the_policy_on_each_awkward_file(awkward, reference):
    for name, rgb in reference.items():
        assert rgb.shape == (*SIZE, 3) and rgb.dtype == np.float32, name
        assert 0.0 <= rgb.min() and rgb.max() <= 1.0, name
    # Palette images give their colours (index 1 is pure red), not their indices.
    indices = np.asarray(Image.open(awkward / "palette.png"))
    np.testing.assert_array_equal(
        reference["palette.png"][indices == 1], [[1.0, 0.0, 0.0]] * int((indices == 1).sum())
    )
    # Gray files are gray; 16-bit data keeps its precision; 12-bit data in 16 bits is scaled by 4095, not 65535.
    for name in ("gray.jpg", "gray.pgm", "depth16.tif", "depth12.tif", "float32.tif", "stack3.tif"):
        rgb = reference[name]
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]), name
    assert (
        reference["depth12.tif"].max() == pytest.approx(1.0)
        and unsigned_range(load_image(awkward / "depth12.tif")) == 4095
    )
    np.testing.assert_allclose(reference["depth12.tif"], reference["depth16.tif"], atol=1.01 / 4095)  # one 12-bit step
    assert len(np.unique(reference["depth16.tif"])) > 256  # not quantised to 8 bits
    # Transparent pixels (right half) become the ImageNet mean; opaque ones keep their colour.
    rgba = load_image(awkward / "rgba.png")
    np.testing.assert_allclose(
        reference["rgba.png"][:, -1], np.broadcast_to([0.485, 0.456, 0.406], (SIZE[0], 3)), atol=1e-6
    )
    np.testing.assert_allclose(reference["rgba.png"][:, 0], rgba[:, 0, :3] / 255, atol=1e-6)
    # A stack reads its first page; every source type gives the same array.
    np.testing.assert_array_equal(read_rgb01(awkward / "stack3.tif", page=0), reference["stack3.tif"])
    path = awkward / "depth16.tif"
    for source in (str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": "x.tif"},
                   load_image(path), torch.from_numpy(load_image(path).astype(np.int32))):
        np.testing.assert_array_equal(
            to_rgb01(source) if not isinstance(source, (str, bytes, dict)) else read_rgb01(source),
            reference["depth16.tif"],
        )
    np.testing.assert_array_equal(read_rgb01(Image.open(awkward / "gray.pgm")), reference["gray.pgm"])


def test_bad_files_raise_one_error_type_that_names_them(awkward):
    with pytest.raises(ImageReadError, match=CORRUPT):
        read_rgb01(awkward / CORRUPT)
    with pytest.raises(ImageTooSmallError, match=TINY):
        image_to_pixel_values(str(awkward / TINY), 14)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_rgb01(awkward / "absent.png")
    with pytest.raises(ImageReadError, match="x.png"):
        read_rgb01({"bytes": b"rubbish", "path": "x.png"})
    skipped = SkippedInputs(strict=True)
    with pytest.raises(ImageReadError, match=CORRUPT):
        skipped.add(awkward / CORRUPT, ImageReadError(f"{awkward / CORRUPT}: corrupt"))


# --------------------------------------------------------------------------------------------------
# Every entry point, the same arrays
# --------------------------------------------------------------------------------------------------
def test_feature_extraction_takes_paths_and_arrays_alike(awkward, reference, tiny_folder):
    model = Dinov2WithRegistersModel.from_pretrained(tiny_folder).eval()
    for name, rgb in reference.items():
        np.testing.assert_array_equal(
            image_to_pixel_values(str(awkward / name), 14), to_pixel_values(rgb, patch_size=14)
        )
    np.testing.assert_array_equal(extract_patch_features(model, awkward / "depth12.tif"),
                                  extract_patch_features(model, reference["depth12.tif"]))


def test_demo_reads_uploads_like_everyone(awkward, reference):
    for name, rgb in reference.items():
        np.testing.assert_array_equal(prepare_image(read_upload(str(awkward / name)), max_side=4096), rgb)
        np.testing.assert_array_equal(prepare_image(awkward / name, max_side=4096), rgb)
    with pytest.raises(ImageReadError, match=CORRUPT):
        read_upload(str(awkward / CORRUPT))


def test_probe_runner_reads_the_folder_like_everyone_and_skips_the_bad_files(awkward, reference, caplog):
    skipped = SkippedInputs()
    images = dict(folder_images(awkward, skipped=skipped))
    assert set(images) == set(READABLE) | {TINY}
    for name, rgb in reference.items():
        np.testing.assert_array_equal(images[name], rgb)
    assert [str(name).endswith(CORRUPT) for name in skipped.names] == [True]
    assert CORRUPT in caplog.text


def test_probe_and_report_commands_skip_and_name_bad_files_or_fail_with_strict(
    awkward, tiny_folder, tmp_path, caplog, capsys
):
    output = tmp_path / "probe.json"
    results = probe_runner.main(["--models", str(tiny_folder), "--images", str(awkward), "--repeats", "1",
                                 "--step", "2", "--no_progress", "--output_dir", str(tmp_path)])
    reasons = {entry["name"].split("/")[-1]: entry["reason"] for entry in results["skipped"]}
    assert set(reasons) == {CORRUPT, TINY} and "smaller than one 14 x 14 patch" in reasons[TINY]
    assert [image["name"] for image in results["sources"][str(awkward)]] == sorted(READABLE)
    assert json.loads(output.read_text())["skipped"] == results["skipped"]
    assert "Skipped 2 of" in caplog.text and CORRUPT in caplog.text and TINY in caplog.text
    with pytest.raises(ImageReadError, match=CORRUPT):
        probe_runner.main(["--models", str(tiny_folder), "--images", str(awkward), "--strict", "--no_progress"])
    content = report.main(
        [
            "--models",
            str(tiny_folder),
            "--names",
            "stock",
            "--images",
            str(awkward),
            "--repeats",
            "1",
            "--picture_images",
            "1",
            "--output_dir",
            str(tmp_path / "report"),
        ]
    )
    assert {entry["name"].split("/")[-1] for entry in content["probe"]["skipped"]} == {CORRUPT, TINY}
    with pytest.raises(ImageReadError, match=CORRUPT):
        report.main(["--models", str(tiny_folder), "--images", str(awkward), "--strict",
                     "--output_dir", str(tmp_path / "strict")])


def test_scribble_benchmark_reads_pairs_like_everyone(awkward, reference, tmp_path):
    data = tmp_path / "pairs"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for name in READABLE + (CORRUPT,):
        (data / "images" / name).write_bytes((awkward / name).read_bytes())
        mask = np.zeros(SIZE, np.uint8)
        mask[:, : SIZE[1] // 2], mask[:, SIZE[1] // 2 :] = 1, 2
        Image.fromarray(mask).save(data / "masks" / f"{name.rsplit('.', 1)[0]}.png")
    skipped = SkippedInputs(what="image/mask pair")
    pairs = scribble_benchmark.load_image_mask_pairs(data, skipped=skipped)
    by_name = sorted(READABLE)
    assert len(pairs) == len(READABLE) and [str(n).endswith(CORRUPT) for n in skipped.names] == [True]
    for name, (image, _) in zip(by_name, pairs):
        np.testing.assert_array_equal(image, reference[name])
    with pytest.raises(ImageReadError, match=CORRUPT):
        scribble_benchmark.load_image_mask_pairs(data, skipped=SkippedInputs(strict=True))


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------
def test_report_pictures_draw_a_grayscale_micrograph_as_gray():
    from skimage import data

    micrograph = data.cell()  # uint8 (H, W): a fluorescence micrograph
    assert micrograph.dtype == np.uint8 and micrograph.ndim == 2
    labels = np.random.default_rng(0).integers(0, 3, (10, 10))
    figure = side_by_side([micrograph], {"model": [labels]})
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    box = figure.axes[0].get_window_extent()
    height = pixels.shape[0]
    cell = pixels[int(height - box.y1) + 2 : int(height - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2]
    assert len(np.unique(cell[..., 0])) > 20  # the image is drawn, not a blank cell
    np.testing.assert_array_equal(cell[..., 0], cell[..., 1])
    np.testing.assert_array_equal(cell[..., 0], cell[..., 2])
    label_box = figure.axes[1].get_window_extent()
    label_cell = pixels[int(height - label_box.y1) + 2 : int(height - label_box.y0) - 2,
                        int(label_box.x0) + 2 : int(label_box.x1) - 2]
    assert np.abs(label_cell[..., 0] - label_cell[..., 2]).max() > 20  # label maps stay in colour


def test_readme_usage_snippet_reads_a_16_bit_micrograph(tmp_path, tiny_kwargs):
    """The README's first Python snippet, run as written on a saved model and a 16-bit TIFF."""
    import re

    import tifffile

    from alibi_dinov2.features.extraction import extract_patch_features
    from alibi_dinov2.features.preprocessing import dinov2_image_processor
    from configuration_alibi_dinov2 import AlibiDinov2Config
    from modeling_alibi_dinov2 import AlibiDinov2Model

    readme = (REPO_ROOT / "README.md").read_text()
    usage = readme[readme.index("## Use") :]
    snippet = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    torch.manual_seed(0)
    model = AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs)).eval()
    model.save_pretrained(tmp_path / "model")
    dinov2_image_processor().save_pretrained(tmp_path / "model")
    micrograph = (np.random.default_rng(0).random((70, 84)) * 4095).astype(np.uint16)  # 12-bit camera, 16-bit file
    tifffile.imwrite(tmp_path / "micrograph.tif", micrograph)
    code = snippet.replace("path/or/hub-id", str(tmp_path / "model")).replace(
        "micrograph.tif", str(tmp_path / "micrograph.tif")
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    expected = extract_patch_features(model, micrograph / 4095.0)  # (h, w, C)
    np.testing.assert_allclose(namespace["features"][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert namespace["image"].max() > 0.99  # not divided by 65535
