"""The content control of the positional probe: the same probe on the images' own pixels tells an image set whose
content varies with position (an illumination ramp) from a homogeneous one."""

import numpy as np

from alibi_dinov2.synthetic.microstructures import generate_microstructure
from evaluation.content_control import CONTENT_R2_LIMIT, content_flags, patch_pixel_statistics
from evaluation.positional_probe import PROBE_PROTOCOL, ProbeProtocol
from evaluation.probe_runner import content_baseline, format_table, run_probe


RAMPS = ["lr+ud", "lr", "ud", "random"]
PROTOCOL = ProbeProtocol(repeats=2)


def microstructures(count, illumination, size=518):
    """Generated 3-phase microstructures, under a multiplicative illumination ramp of that strength (0: none)."""
    return [
        (f"image_{seed}", generate_microstructure(size=(size, size), n_phases=3, seed=seed, noise=0.05,
                                                  illumination=illumination, grain_size=20)[0])
        for seed in range(count)
    ]


def test_patch_pixel_statistics_are_each_patchs_colour_and_its_neighbourhoods():
    rng = np.random.default_rng(0)
    image = rng.random((30, 45, 3)).astype(np.float32)  # cropped to 5 x 7 patches of 6 px
    statistics = patch_pixel_statistics(image, 6, windows=(3,))
    assert statistics.shape == (5, 7, 9)
    for row, column in [(0, 0), (2, 3), (4, 6)]:
        patch = image[6 * row : 6 * row + 6, 6 * column : 6 * column + 6].reshape(-1, 3)
        np.testing.assert_allclose(statistics[row, column, :3], patch.mean(0), rtol=1e-5)
        np.testing.assert_allclose(statistics[row, column, 3:6], patch.std(0), rtol=1e-4)
    means = statistics[..., :3]
    np.testing.assert_allclose(statistics[2, 3, 6:], means[1:4, 2:5].reshape(-1, 3).mean(0), rtol=1e-5)
    # Mirrored at the border: the window around (0, 0) counts row 0 and column 0 twice.
    corner = means[[0, 0, 1]][:, [0, 0, 1]].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(statistics[0, 0, 6:], corner, rtol=1e-5)
    gray = patch_pixel_statistics(image[..., 0], 6)
    np.testing.assert_allclose(gray[..., 0], gray[..., 1])  # gray images are replicated to RGB, as models see them


def test_a_pure_gradient_is_all_content_and_noise_is_none():
    width = np.linspace(0, 1, 518, dtype=np.float32)
    gradient = [("gradient", np.tile(width, (518, 1)))]
    noise = [("noise", np.random.default_rng(0).random((518, 518), dtype=np.float32))]
    assert content_baseline(gradient, 14, ["lr"], PROTOCOL)["lr"]["mean"] > 0.99
    assert content_baseline(noise, 14, ["lr"], PROTOCOL)["lr"]["mean"] < 0


def test_an_illumination_ramp_is_flagged_and_homogeneous_microstructures_are_not():
    baseline = {
        "ramp": content_baseline(microstructures(2, illumination=1.0), 14, RAMPS, PROTOCOL),
        "homogeneous": content_baseline(microstructures(2, illumination=0.0), 14, RAMPS, PROTOCOL),
    }
    flags = content_flags(baseline)
    assert flags["ramp"]["flagged"] and flags["ramp"]["r2"] >= CONTENT_R2_LIMIT  # about 0.54
    assert not flags["homogeneous"]["flagged"] and flags["homogeneous"]["r2"] < CONTENT_R2_LIMIT / 2  # about 0.04
    assert flags["ramp"]["ramp"] != "random"
    assert baseline["ramp"]["random"]["mean"] < 0  # the random ramp stays the control, whatever the content


def test_the_baseline_is_the_protocols_probe_of_each_images_pixels():
    images = microstructures(2, illumination=1.0, size=252) + [("small", np.zeros((100, 100), np.float32))]
    baseline = content_baseline(images, 14, ["lr+ud"], ProbeProtocol(step=3, repeats=2))
    expected = [
        [ProbeProtocol(step=3, repeats=2).linear_probe(patch_pixel_statistics(image, 14), "lr+ud", index, repeat)
         for repeat in range(2)]
        for index, (_, image) in enumerate(images[:2])
    ]
    np.testing.assert_allclose(baseline["lr+ud"]["per_image"], expected)  # the 7 x 7 grid of `small` is left out
    assert baseline["lr+ud"]["n"] == 4


def test_the_probe_runner_reports_the_baseline_per_patch_size_and_names_a_flagged_set():
    from conftest import tiny_alibi_model

    sources = {"ramp": microstructures(1, illumination=1.0), "homogeneous": microstructures(1, illumination=0.0)}
    results = run_probe({"alibi": tiny_alibi_model()}, sources, ramps=RAMPS, protocol=PROTOCOL, progress=False)
    assert list(results["content_baseline"]) == ["14"]
    assert results["content_baseline"]["14"]["ramp"] == content_baseline(sources["ramp"], 14, RAMPS, PROTOCOL)
    table = format_table(results)
    assert "image content (14 px patches)  homogeneous" in table
    assert "ramp: the images' own pixels (14 px patches) predict position" in table
    assert "homogeneous: the images' own pixels" not in table
    assert PROBE_PROTOCOL.step == PROTOCOL.step  # the control runs the project's protocol
