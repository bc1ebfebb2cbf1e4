"""The positional-bias report: tables, pictures and checks of several models on one HTML page."""

import html
import json

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from alibi_dinov2.features.extraction import extract_patch_features
from alibi_dinov2.io.image_sets import load_image_source
from alibi_dinov2.synthetic.microstructures import generate_microstructure
from alibi_dinov2.synthetic.teachers import smooth_position_embedding
from configuration_alibi_dinov2 import AlibiDinov2Config
from evaluation.content_control import CONTENT_MEANING
from evaluation.report import TRANSFORM_CAPTION, build_report, headline, main
from modeling_alibi_dinov2 import AlibiDinov2Model


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=224)


def positional_model():
    """Tiny DINOv2 whose position embedding holds smooth lr and ud ramps (the quickstart's synthetic leak)."""
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY)).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.copy_(smooth_position_embedding(16, 32, amplitude=10.0, channels=4))
    return model


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    models = {"positional": positional_model(), "alibi": AlibiDinov2Model(AlibiDinov2Config(**TINY)).eval()}
    sources = {
        "noise": load_image_source("noise:2", size=(518, 518)),
        "micro": load_image_source("micro:1", size=(252, 294)),
        "ramp": [("lit", generate_microstructure(size=(518, 518), n_phases=3, seed=0, noise=0.05, illumination=1.0,
                                                 grain_size=20)[0])],
    }
    return build_report(models, sources, tmp_path, repeats=2, picture_images=2, progress=False,
                        notes=["synthetic models"]), tmp_path


def test_report_ranks_positional_bias_and_passes_the_control(report):
    content, _ = report
    noise = {model: content["summary"][model]["noise"] for model in ("positional", "alibi")}
    assert noise["positional"]["lr+ud"]["mean"] > 0.8
    assert noise["alibi"]["lr+ud"]["mean"] < 0.1
    for model in noise:
        assert noise[model]["random"]["mean"] < 0.1
    # Wrapped ALiBi is roll-equivariant; the learned embedding is not.
    errors = content["transform_errors"]
    assert errors["alibi"]["roll"] < 1e-4 < errors["positional"]["roll"]


def test_report_writes_html_json_and_pictures(report):
    content, folder = report
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk["summary"] == content["summary"]
    page = (folder / "report.html").read_text()
    assert "synthetic models" in page and "<th>positional</th>" in page and "<th>alibi</th>" in page
    for name in content["figures"].values():
        assert (folder / name).stat().st_size > 1000 and f'src="{name}"' in page
    assert set(content["figures"]) == {"pca", "kmeans", "cosine", "channels", "fingerprint"}


def test_command_line_loads_saved_folders(tmp_path):
    torch.manual_seed(0)
    AlibiDinov2Model(AlibiDinov2Config(**TINY)).save_pretrained(tmp_path / "alibi")
    positional_model().save_pretrained(tmp_path / "positional")
    content = main(["--models", str(tmp_path / "alibi"), str(tmp_path / "positional"), "--names", "A", "P",
                    "--images", "noise:1", "--size", "84", "84", "--repeats", "1", "--picture-images", "1",
                    "--output-dir", str(tmp_path / "out")])
    assert set(content["summary"]) == {"A", "P"}
    assert (tmp_path / "out" / "report.html").exists()
    with pytest.raises(SystemExit):
        main(["--models", "a", "b", "--names", "only-one"])


def test_headline_opens_the_page_with_the_numbers_of_the_json(report):
    content, folder = report
    page = (folder / "report.html").read_text()
    on_disk = json.loads((folder / "report.json").read_text())
    assert set(on_disk["headline"]) == {"positional", "alibi"}
    for model, line in on_disk["headline"].items():
        assert line == content["headline"][model]
        assert line["r2_clipped"] == max(line["r2"], 0.0)
        assert f"positional R^2 {line['r2_clipped']:.2f} (raw {line['r2']:+.2f})" in line["sentence"]
        assert f"roll-equivariance error {line['roll_error']:.1e}" in line["sentence"]
        assert html.escape(line["sentence"]) in page
    assert page.index("class=headline") < page.index("<table")  # the answer comes first
    assert "no better than always guessing the mean" in page
    assert "its features encode position" in on_disk["headline"]["positional"]["sentence"]
    assert "do not encode position" in on_disk["headline"]["alibi"]["sentence"]


def test_a_set_whose_content_varies_with_position_is_named_and_left_out_of_the_verdict(report):
    content, folder = report
    page = (folder / "report.html").read_text()
    for model in ("positional", "alibi"):
        flags = content["content_control"][model]
        assert flags["ramp"]["flagged"] and not flags["noise"]["flagged"]  # the illumination ramp; about 0.5 and -0.3
        line = content["headline"][model]
        assert line["r2_sets"] == ["noise", "micro"] and line["content_flagged"] == ["ramp"]
        counted = [content["summary"][model][source]["lr+ud"]["mean"] for source in ("noise", "micro")]
        assert line["r2"] == pytest.approx(sum(counted) / 2)
        assert (f"not counted: ramp, whose content varies with position (its pixels alone give "
                f"{flags['ramp']['ramp']} R^2 {flags['ramp']['r2']:.2f})") in line["sentence"]
    assert html.escape(CONTENT_MEANING) in page and "image content<br>(14 px patches)" in page
    assert page.count("class=flagged") == 3 * len(content["summary"]["alibi"]["ramp"])  # 2 models + the baseline
    # On the ramp alone, no verdict: the R^2 there can be content.
    only_ramp = {model: {"ramp": by_source["ramp"]} for model, by_source in content["summary"].items()}
    for line in headline(only_ramp, content["transform_errors"], {}, None, None, content["content_control"]).values():
        assert "encode position" not in line["sentence"] and "no evidence for or against" in line["sentence"]
        assert line["r2_sets"] == [] and line["content_flagged"] == ["ramp"]


def test_the_transformation_table_says_what_each_column_measures_and_expects(report):
    content, folder = report
    page = (folder / "report.html").read_text()
    assert html.escape(TRANSFORM_CAPTION) in page
    for column in content["transform_errors"]["alibi"]:  # every column measured is explained
        assert f"{column}:" in TRANSFORM_CAPTION or f"{column} " in TRANSFORM_CAPTION
    roll = content["transform_errors"]["alibi"]["roll"]
    assert roll < 1e-4 and f"<td>{roll:.1e}</td>" in page  # float rounding, shown as such (not as 0.0000)


def test_reference_model_gives_each_model_its_patch_cosine(tmp_path):
    torch.manual_seed(0)
    teacher = positional_model()
    models = {"teacher": teacher, "copy": teacher, "alibi": AlibiDinov2Model(AlibiDinov2Config(**TINY)).eval()}
    sources = {"noise": load_image_source("noise:1", size=(252, 252)),
               "heldout": load_image_source("noise:3", size=(126, 140), seed=1)}
    content = build_report(models, sources, tmp_path, repeats=1, picture_images=1, progress=False, reference="teacher",
                           cosine_set="heldout")
    cosines = content["cosine_to_reference"]
    assert cosines["teacher"] is None and abs(cosines["copy"] - 1.0) < 1e-6 and cosines["alibi"] < 0.99
    # One figure: every patch of every image of the named set (not the pictured images), computed independently.
    pairs = [(extract_patch_features(models["alibi"], image), extract_patch_features(teacher, image))
             for _, image in sources["heldout"]]
    expected = torch.cat([torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=-1)
                          .flatten() for a, b in pairs]).mean().item()
    assert cosines["alibi"] == pytest.approx(expected, abs=1e-5)
    assert content["cosine_images"] == {"set": "heldout", "images": 3}
    # The same number and image set in the headline, report.json and the page.
    on_disk = json.loads((tmp_path / "report.json").read_text())
    page = (tmp_path / "report.html").read_text()
    for model in ("copy", "alibi"):
        quoted = f"content kept: patch cosine to teacher {cosines[model]:.2f} on the 3 images of heldout"
        assert quoted in content["headline"][model]["sentence"]
        assert on_disk["headline"][model]["sentence"] == content["headline"][model]["sentence"]
        assert on_disk["cosine_to_reference"][model] == cosines[model]
        assert html.escape(quoted) in page
    assert on_disk["cosine_images"] == {"set": "heldout", "images": 3}
    assert "averaged over every patch of the 3 images of heldout" in page
    with pytest.raises(ValueError, match="reference"):
        build_report(models, sources, tmp_path, repeats=1, progress=False, reference="nobody")
    with pytest.raises(ValueError, match="cosine_set"):
        build_report(models, sources, tmp_path, repeats=1, progress=False, reference="teacher", cosine_set="micro")


def test_command_line_names_models_and_sets_by_their_last_path_part(tmp_path):
    folder = tmp_path / "runs" / "positional-teacher"
    positional_model().save_pretrained(folder)
    images = tmp_path / "deep" / "path" / "imgs"
    images.mkdir(parents=True)
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (252, 252, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "broken.png").write_bytes(b"not a png")
    content = main(["--models", str(folder), "--images", str(images), "--repeats", "1", "--picture_images", "1",
                    "--output_dir", str(tmp_path / "out")])
    assert list(content["summary"]) == ["positional-teacher"]
    assert list(content["summary"]["positional-teacher"]) == ["imgs"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert str(images) not in page.split("<h2>Skipped inputs")[0] and "<td class=set>imgs</td>" in page
    # The skipped file is listed on the page with its reason, as in report.json.
    (skipped,) = json.loads((tmp_path / "out" / "report.json").read_text())["skipped"]
    assert skipped["name"].endswith("broken.png") and skipped["reason"]
    assert "<h2>Skipped inputs (1)</h2>" in page
    name, reason = skipped["name"], skipped["reason"].removeprefix(skipped["name"] + ": ")
    assert reason.startswith("not a readable image")  # the page does not repeat the name
    assert f"<td class=set>{html.escape(name)}</td><td class=set>{html.escape(reason)}</td>" in page


def test_report_takes_alibi_dinov3_and_stock_dinov3(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from conftest import TINY_DINOV3, tiny_alibi_model

    torch.manual_seed(0)
    stock = DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3, num_register_tokens=4)).eval()
    with torch.no_grad():  # sharp attention, as trained models have: random weights hardly attend by position
        for layer in stock.model.layer:
            layer.attention.q_proj.weight.mul_(10)
            layer.attention.k_proj.weight.mul_(10)
    models = {"alibi-dinov3": tiny_alibi_model("alibi_dinov3"), "dinov3": stock}
    sources = {"noise": load_image_source("noise:1", size=(160, 192))}
    content = build_report(models, sources, tmp_path, repeats=1, picture_images=1, progress=False)
    assert set(content["summary"]) == set(models)
    assert content["probe"]["grids"]["alibi-dinov3"]["noise"] == [[10, 12]]
    # RoPE on a grid is not periodic, wrapped ALiBi is: rolls by whole 16 px patches move only the latter's features.
    errors = content["transform_errors"]
    assert errors["alibi-dinov3"]["roll"] < 1e-4 < errors["dinov3"]["roll"]
    assert "<th>alibi-dinov3</th>" in (tmp_path / "report.html").read_text()
