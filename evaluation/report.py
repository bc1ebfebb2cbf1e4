"""Positional-bias report: one HTML page (with PNG pictures and a JSON file) comparing models.

    python -m evaluation.report --models facebook/dinov2-with-registers-small out/alibi-dinov2-small \\
        --images micro textures --output_dir outputs/report

For every model: the positional linear-probe R^2 table (the `random` ramp is the control and must score about 0),
per-channel R^2, the layer x channel fingerprint, PCA / k-means / cosine-similarity pictures side by side, and the
transformation check (flip, rot90, roll by whole patches). Models are named by their Hub id or folder.
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from alibi_dinov2.cli import ArgumentParser, run_command
from alibi_dinov2.features.extraction import extract_patch_features
from alibi_dinov2.features.visualisation import (
    cosine_similarity_map,
    kmeans_map,
    pca_rgb,
    plot_channel_r2,
    plot_layer_fingerprint,
    side_by_side,
)
from alibi_dinov2.hub.models import load_model
from alibi_dinov2.io.files import write_json_atomic, write_text_atomic
from alibi_dinov2.io.image_sets import NamedImage
from alibi_dinov2.io.images import ImageReadError, SkippedInputs
from alibi_dinov2.names import display_names, short_names
from evaluation.content_control import CONTENT_MEANING, content_flags
from evaluation.positional_probe import PROBE_PROTOCOL, R2_MEANING, ProbeProtocol, describe_r2, layer_fingerprint
from evaluation.probe_runner import ImageSetArguments, load_image_sets, run_probe
from evaluation.transform_check import transform_check


DEFAULT_RAMPS = ("lr+ud", "lr", "ud", "radial", "random")


def _save(figure, path: Path) -> str:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path.name


def shown_features(
    models: Mapping[str, object], images: Sequence[NamedImage], image_processors: Mapping[str, object] | None = None
) -> dict[str, list[np.ndarray]]:
    """Last-layer patch features of every model on every pictured image: {model: [(h, w, C), ...]}."""
    image_processors = dict(image_processors or {})
    return {
        name: [extract_patch_features(model, image, image_processors.get(name)) for _, image in images]
        for name, model in models.items()
    }


def patch_cosines(features: Mapping[str, list[np.ndarray]], reference: str) -> dict[str, float | None]:
    """Mean cosine similarity, over patches and images, of each model's patch features to the reference model's
    (None where the grids or widths differ)."""
    cosines = {}
    for name, grids in features.items():
        pairs = list(zip(grids, features[reference]))
        if name == reference or any(a.shape != b.shape for a, b in pairs):
            cosines[name] = None
            continue
        values = [
            np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
            for a, b in pairs
        ]
        cosines[name] = float(np.mean(np.concatenate([v.ravel() for v in values])))
    return cosines


def reference_cosines(
    models: Mapping[str, object],
    images: Sequence[NamedImage],
    reference: str,
    image_processors: Mapping[str, object] | None = None,
) -> tuple[dict[str, float | None], int]:
    """The report's one patch cosine to the reference model: :func:`patch_cosines` of the last-layer features of
    every image of one set (at native size, cropped to the patch grid) that every model takes. Returns
    `({model: cosine}, images used)`."""
    usable = []
    features = {name: [] for name in models}
    for item in images:
        try:
            grids = shown_features(models, [item], image_processors)
        except ImageReadError:
            continue  # unreadable or too small: named in the probe's skipped inputs
        usable.append(item)
        for name in models:
            features[name].extend(grids[name])
    if not usable:
        return {name: None for name in models}, 0
    return patch_cosines(features, reference), len(usable)


def feature_pictures(
    features: Mapping[str, list[np.ndarray]],
    images: Sequence[NamedImage],
    output_dir: Path,
    n_clusters: int = 4,
) -> dict[str, str]:
    """PCA-RGB, k-means and cosine-similarity (from the centre patch) maps of every model on every image, one
    side-by-side PNG per kind. Returns {kind: file name}."""
    maps = {"pca": {}, "kmeans": {}, "cosine": {}}
    for name, grids in features.items():
        maps["pca"][name] = [pca_rgb(f, standardised=True) for f in grids]
        maps["kmeans"][name] = [kmeans_map(f, n_clusters=n_clusters, standardised=True) for f in grids]
        maps["cosine"][name] = [cosine_similarity_map(f, (f.shape[0] // 2, f.shape[1] // 2)) for f in grids]
    titles = [image_name for image_name, _ in images]
    pictures = [image for _, image in images]
    return {
        kind: _save(side_by_side(pictures, kind_maps, image_titles=titles), output_dir / f"{kind}.png")
        for kind, kind_maps in maps.items()
    }


def fingerprints(
    models: Mapping[str, object],
    images: Sequence[NamedImage],
    ramp: str = "lr",
    protocol: ProbeProtocol = PROBE_PROTOCOL,
    image_processors: Mapping[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """Channels x layers per-channel R^2 of every model, averaged over the images, one sampling of `protocol` per
    image (every layer sees the same positions): {model: (C, L)}."""
    image_processors = dict(image_processors or {})
    return {
        name: layer_fingerprint(
            [extract_patch_features(model, image, image_processors.get(name), layers="all") for _, image in images],
            ramp=ramp,
            step=protocol.step,
            sampling=protocol.sampling,
            alpha=protocol.alpha,
            holdout=protocol.holdout,
            seed=protocol.seed,
        )
        for name, model in models.items()
    }


def build_report(
    models: Mapping[str, object],
    sources: Mapping[str, Sequence[NamedImage]],
    output_dir,
    ramps: Sequence[str] = DEFAULT_RAMPS,
    repeats: int = PROBE_PROTOCOL.repeats,
    picture_images: int = 3,
    seed: int = PROBE_PROTOCOL.seed,
    image_processors: Mapping[str, object] | None = None,
    title: str = "Positional-bias report",
    notes: Sequence[str] = (),
    progress: bool = True,
    skipped: SkippedInputs | None = None,
    reference: str | None = None,
    cosine_set: str | None = None,
) -> dict:
    """Probe, picture and check every model; write `report.json`, `report.html` and PNGs to `output_dir`.

    Args:
        models: {display name: transformers model}.
        sources: {image-set name: [(image name, image array), ...]}.
        picture_images: images (the first of each set) shown in the pictures and used for the fingerprint and the
            transformation check.
        notes: lines shown under the title (e.g. that a model is synthetic).
        skipped: inputs left out so far (see `evaluation.probe_runner.run_probe`).
        reference: name of the model whose features the others should keep (the teacher or base model): the
            headline gives each model's patch cosine to it.
        cosine_set: the image set of that patch cosine, all its images (default: the first set).

    Returns:
        The JSON content: `headline` (see :func:`headline`), `probe` (see `evaluation.probe_runner.run_probe`),
        `summary[model][set][ramp]` (mean, std), `content_control[model][set]` (see
        `evaluation.content_control.content_flags`), `transform_errors[model][transform]`, `cosine_to_reference`
        and `cosine_images` (`{"set", "images"}` it was measured on), `skipped` (name and reason of each input
        left out), `warnings` (images left out of the means), `figures`.
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    cosine_set = cosine_set or next(iter(sources))
    if cosine_set not in sources:
        raise ValueError(f"cosine_set {cosine_set!r} is not one of the image sets {list(sources)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    protocol = replace(PROBE_PROTOCOL, repeats=repeats, seed=seed)
    probe = run_probe(models, sources, ramps=ramps, protocol=protocol, per_channel=True,
                      image_processors=image_processors, progress=progress, skipped=skipped)
    shown = [item for images in sources.values() for item in images[: max(1, picture_images // len(sources))]]
    shown = shown[:picture_images] or [next(iter(sources.values()))[0]]
    steps = tqdm(total=4, desc="report", disable=not progress, file=sys.stderr)
    features = shown_features(models, shown, image_processors)
    figures = feature_pictures(features, shown, output_dir)
    cosines, cosine_count = {}, 0
    if reference:
        cosines, cosine_count = reference_cosines(models, sources[cosine_set], reference, image_processors)
    steps.update(1)
    figures.update(probe_figures(models, shown, probe, protocol, output_dir, image_processors))
    steps.update(2)
    errors = transform_check(models, [image for _, image in shown])
    steps.update(1)
    steps.close()
    summary = {
        model: {
            source: {ramp: {"mean": s["mean"], "std": s["std"]} for ramp, s in by_ramp.items()}
            for source, by_ramp in by_source.items()
        }
        for model, by_source in probe["scores"].items()
    }
    content = {
        model: content_flags(probe["content_baseline"][str(description["patch_size"])])
        for model, description in probe["models"].items()
    }
    cosine_images = {"set": cosine_set, "images": cosine_count} if reference else None
    report = {
        "title": title,
        "notes": list(notes),
        "headline": headline(summary, errors, cosines, reference, cosine_images, content),
        "summary": summary,
        "content_control": content,
        "transform_errors": errors,
        "cosine_to_reference": cosines,
        "cosine_images": cosine_images,
        "reference": reference,
        "skipped": probe["skipped"],
        "warnings": [warning["message"] for warning in probe["warnings"]],
        "figures": figures,
        "probe": probe,
    }
    write_json_atomic(output_dir / "report.json", report)
    write_text_atomic(output_dir / "report.html", render_html(report))
    return report


def probe_figures(models, shown, probe: dict, protocol: ProbeProtocol, output_dir: Path,
                  image_processors=None) -> dict[str, str]:
    """The per-channel R^2 plot (lr ramp, first image set) and the layer fingerprint: {kind: file name}."""
    first_source = next(iter(probe["sources"]))
    channel_series = {name: probe["per_channel"][name][first_source]["lr"] for name in models}
    return {
        "channels": _save(
            plot_channel_r2(channel_series, kind="line", title=f"per-channel R^2, lr ramp ({first_source})"),
            output_dir / "channels.png",
        ),
        "fingerprint": _save(
            plot_layer_fingerprint(fingerprints(models, shown, protocol=protocol, image_processors=image_processors),
                                   title="per-channel R^2 against the lr ramp, every layer"),
            output_dir / "fingerprint.png",
        ),
    }


def _headline_r2(by_source: Mapping[str, Mapping[str, dict]]) -> float:
    """lr+ud R^2 averaged over the image sets (the first non-random ramp when lr+ud was not probed)."""
    ramps = list(next(iter(by_source.values())))
    ramp = "lr+ud" if "lr+ud" in ramps else next((r for r in ramps if r != "random"), ramps[0])
    values = [per_ramp[ramp]["mean"] for per_ramp in by_source.values() if np.isfinite(per_ramp[ramp]["mean"])]
    return float(np.mean(values)) if values else float("nan")


def _content_clause(flagged: Mapping[str, dict]) -> str:
    """`its pixels alone give lr R^2 0.35` (one image set whose content varies with position) or `their pixels alone
    give lr R^2 0.35 on A, ud R^2 0.20 on B`."""
    if len(flagged) == 1:
        (flag,) = flagged.values()
        return f"its pixels alone give {flag['ramp']} R^2 {flag['r2']:.2f}"
    return "their pixels alone give " + ", ".join(
        f"{flag['ramp']} R^2 {flag['r2']:.2f} on {source}" for source, flag in flagged.items()
    )


def headline(
    summary: dict,
    transform_errors: dict,
    cosines: Mapping[str, float | None],
    reference: str | None,
    cosine_images: Mapping[str, object] | None = None,
    content: Mapping[str, Mapping[str, dict]] | None = None,
) -> dict:
    """One sentence per model: its positional R^2 (clipped at 0, raw beside it) on the image sets whose content does
    not vary with position (`content`, see `evaluation.content_control.content_flags`; no verdict where every set's
    does), the content it kept (patch cosine to the reference model on `cosine_images`) and its roll-equivariance
    error. Returns {model: {numbers..., "sentence": str}}."""
    lines = {}
    for model, by_source in summary.items():
        flags = (content or {}).get(model, {})
        flagged = {source: flags[source] for source in by_source if flags.get(source, {}).get("flagged")}
        counted = [source for source in by_source if source not in flagged]
        r2 = _headline_r2({source: by_source[source] for source in counted or by_source})
        score = f"{model}: positional R^2 {max(r2, 0.0):.2f} (raw {r2:+.2f}) on {', '.join(counted or by_source)}"
        if not counted:
            parts = [f"{score}, whose content itself varies with position ({_content_clause(flagged)}): this R^2 "
                     "can be content and is no evidence for or against positional encoding; probe homogeneous images "
                     "(e.g. --images micro) to measure it"]
        else:
            parts = [f"{score}: its features {describe_r2(r2)}"]
            if flagged:
                parts.append(f"not counted: {', '.join(flagged)}, whose content varies with position "
                             f"({_content_clause(flagged)})")
        cosine = cosines.get(model)
        if cosine is not None:
            parts.append(f"content kept: patch cosine to {reference} {cosine:.2f} on "
                         f"{describe_cosine_images(cosine_images)}")
        roll = transform_errors.get(model, {}).get("roll")
        if roll is not None:
            parts.append(f"roll-equivariance error {roll:.1e}")
        lines[model] = {"r2": r2, "r2_clipped": max(r2, 0.0), "r2_sets": counted, "content_flagged": list(flagged),
                        "cosine_to_reference": cosine, "cosine_images": dict(cosine_images or {}),
                        "roll_error": roll, "sentence": "; ".join(parts) + "."}
    return lines


def describe_cosine_images(cosine_images: Mapping[str, object] | None) -> str:
    """`the 4 images of held-out` (how the patch cosine's image set is named everywhere)."""
    if not cosine_images:
        return "the images"
    count = cosine_images["images"]
    return f"the {count} image{'s' if count != 1 else ''} of {cosine_images['set']}"


def _score_cell(score: dict, flagged: bool = False) -> str:
    if not np.isfinite(score["mean"]):
        return '<td title="every image of this set was left out: grids too small to probe">n/a</td>'
    style = ' class=flagged title="content that varies with position"' if flagged else ""
    return f"<td{style}>{score['mean']:.3f} &plusmn; {score['std']:.3f}</td>"


TRANSFORM_CAPTION = (
    "Each column transforms the image, extracts its features and compares them with the same transform applied to "
    "the features of the untransformed image (relative L2 error; 0: the features move exactly with the image). "
    "flip_lr / flip_ud: mirror left-right / up-down; rot90: a quarter turn counter-clockwise; roll: a cyclic shift "
    "by half the grid, in whole patches. A wrapped ALiBi model is exactly equivariant to the roll (its bias depends "
    "only on wrapped distances, which a cyclic shift keeps), so its roll error is float rounding; a learned "
    "position embedding or RoPE stays with the frame and gives a large one. No model here is expected to be "
    "equivariant to flips or rot90: they also mirror or turn the pixels inside every patch, and the learned weights "
    "(patch embedding, attention, MLPs) are not flip- or rotation-invariant, so the features of a flipped image are "
    "not the flipped features even though ALiBi's distances are symmetric. Large errors there are expected for "
    "every model and say nothing about position: read the roll column."
)


def _error_text(error: float) -> str:
    """4 decimals, or 2 significant digits below 1e-3 (float rounding shows as such, not as 0.0000)."""
    return f"{error:.4f}" if error >= 1e-3 else f"{error:.1e}"


def _probe_rows(report: dict, ramps: Sequence[str]) -> str:
    """The R^2 table's rows: each model on each image set (sets whose content varies with position marked), then
    the content baseline of each patch size."""
    escape = html.escape
    summary, content = report["summary"], report.get("content_control", {})
    rows = []
    for model, by_source in summary.items():
        for index, source in enumerate(by_source):
            name = f'<th rowspan="{len(by_source)}">{escape(model)}</th>' if index == 0 else ""
            flagged = content.get(model, {}).get(source, {}).get("flagged", False)
            cells = "".join(_score_cell(by_source[source][ramp], flagged) for ramp in ramps)
            rows.append(f"<tr>{name}<td class=set>{escape(source)}</td>{cells}</tr>")
    for patch_size, by_source in report["probe"].get("content_baseline", {}).items():
        flags = content_flags(by_source)
        for index, source in enumerate(by_source):
            name = (f'<th rowspan="{len(by_source)}" class=control>image content<br>({escape(patch_size)} px patches)'
                    "</th>") if index == 0 else ""
            cells = "".join(_score_cell(by_source[source][ramp], flags[source]["flagged"]) for ramp in ramps)
            rows.append(f"<tr class=control>{name}<td class=set>{escape(source)}</td>{cells}</tr>")
    return "".join(rows)


def _skipped_html(skipped: Sequence[Mapping[str, str]]) -> str:
    """The inputs left out, each with its reason (nothing when none was)."""
    if not skipped:
        return ""
    escape = html.escape
    rows = "".join(f"<tr><td class=set>{escape(item['name'])}</td><td class=set>"
                   f"{escape(item['reason'].removeprefix(item['name'] + ': '))}</td></tr>" for item in skipped)
    return (f"<h2>Skipped inputs ({len(skipped)})</h2><p>Left out of every table and picture (pass --strict to "
            f"fail instead):</p><div class=scroll><table><tr><th>input</th><th>reason</th></tr>{rows}</table></div>")


def _cosine_html(report: dict) -> str:
    """What the headline's patch cosine is, and on which images."""
    if not report.get("reference"):
        return ""
    return (f"<p class=meaning>Patch cosine to {html.escape(report['reference'])}: the cosine similarity of each "
            "model's last-layer patch features to the reference model's at the same patch, averaged over every patch "
            f"of {html.escape(describe_cosine_images(report.get('cosine_images')))} (native size, cropped to the "
            "patch grid); 1 = the same features.</p>")


def render_html(report: dict) -> str:
    """A self-contained page (pictures referenced beside it) of the report's tables and figures."""
    escape = html.escape
    summary = report["summary"]
    ramps = list(next(iter(next(iter(summary.values())).values())))
    header = "".join(f"<th>{escape(ramp)}</th>" for ramp in ramps)
    transforms = list(next(iter(report["transform_errors"].values())))
    transform_rows = "".join(
        f"<tr><th>{escape(model)}</th>"
        + "".join(f"<td>{_error_text(report['transform_errors'][model][t])}</td>" for t in transforms)
        + "</tr>"
        for model in report["transform_errors"]
    )
    figures = report["figures"]
    captions = {
        "pca": "PCA colours of the patch features: on homogeneous material, smooth left-right or radial gradients "
               "are position, not content.",
        "kmeans": "k-means clusters of the patch features: clusters that follow the image frame (bands, rings) "
                  "instead of the material are position.",
        "cosine": "Similarity of every patch to the centre patch: a bright blob around the centre on a homogeneous "
                  "image means nearby patches look alike because they are near, not because they are alike.",
        "channels": "Per-channel R^2 against the left-right ramp: spikes are positional channels.",
        "fingerprint": "Per-channel R^2 against the left-right ramp after every layer: where position enters "
                       "and how it spreads.",
    }
    figure_html = "".join(
        f'<figure><img src="{escape(name)}" alt="{escape(kind)}"><figcaption>{escape(captions.get(kind, kind))}'
        "</figcaption></figure>"
        for kind, name in figures.items()
    )
    notes = "".join(f"<p class=note>{escape(note)}</p>" for note in report["notes"])
    sentences = "".join(f"<li>{escape(line['sentence'])}</li>" for line in report["headline"].values())
    warnings = "".join(f"<p class=warning>{escape(message)}</p>" for message in report.get("warnings", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(report["title"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }}
th {{ background: #f4f4f4; }}
.note {{ background: #fff6d6; padding: 0.5em 1em; border-left: 4px solid #e0b000; }}
.warning {{ background: #fde8e8; padding: 0.5em 1em; border-left: 4px solid #c03030; }}
.headline {{ font-size: 1.15em; line-height: 1.5; }} .meaning {{ color: #555; }}
.scroll {{ overflow-x: auto; max-width: 100%; }} table {{ font-size: 0.9em; }} td.set {{ text-align: left; }}
tr.control td, th.control {{ color: #555; font-style: italic; }} td.flagged {{ background: #fff0c0; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; }}
</style></head><body>
<h1>{escape(report["title"])}</h1>
<ul class=headline>{sentences}</ul>
<p class=meaning>{escape(R2_MEANING)}</p>
{_cosine_html(report)}
{notes}{warnings}
<h2>Positional linear probe (R^2, mean &plusmn; std over images and samplings)</h2>
<p>One row per model and image set: high values on the lr / ud / radial ramps mean the features encode where a
patch sits; the <code>random</code> column is the control; n/a: every image of the set was too small to probe.
The <i>image content</i> rows are the same probe on the images' own pixels; shaded cells: the set's content varies
with position.</p>
<p class=meaning>{escape(CONTENT_MEANING)}</p>
<div class=scroll><table><tr><th>model</th><th>image set</th>{header}</tr>{_probe_rows(report, ramps)}</table></div>
<h2>Transformation check (relative L2 error: features of the transformed image vs transformed features)</h2>
<p>{escape(TRANSFORM_CAPTION)}</p>
<div class=scroll><table><tr><th>model</th>{''.join(f'<th>{escape(t)}</th>' for t in transforms)}</tr>\
{transform_rows}</table></div>
{_skipped_html(report.get("skipped", []))}
<h2>Pictures</h2>
{figure_html}
</body></html>
"""


@dataclass
class ReportArguments:
    """Models and layout of ``python -m evaluation.report``."""

    models: list[str] = field(metadata={"help": "Hub ids or folders (loaded with trust_remote_code)"})
    names: list[str] | None = field(default=None, metadata={"help": "display names, one per model (default: the last "
                                                                  "part of each path or Hub id)"})
    ramps: list[str] = field(default_factory=lambda: list(DEFAULT_RAMPS), metadata={"help": "ramps to probe"})
    repeats: int = field(default=PROBE_PROTOCOL.repeats, metadata={"help": "random samplings per image"})
    picture_images: int = field(default=3, metadata={"help": "images shown in the pictures"})
    seed: int = field(default=PROBE_PROTOCOL.seed, metadata={"help": "seed of the samplings and generated sets"})
    reference: str | None = field(default=None, metadata={"help": "name (or source) of the model the others should "
                                                                  "keep the content of, e.g. the teacher"})
    device: str | None = field(default=None, metadata={"help": "e.g. cuda; default: CPU"})
    output_dir: str = field(default="outputs/report", metadata={"help": "folder of report.html, report.json, PNGs"})

    def __post_init__(self):
        display_names(self.models, self.names)
        if "lr" not in self.ramps:
            self.ramps.append("lr")  # the per-channel plot uses it


@dataclass
class ReportImageArguments(ImageSetArguments):
    images: list[str] = field(
        default_factory=lambda: ["micro"],
        metadata={"help": "image sets: textures, micro, noise (NAME:COUNT), an image file or folder, or hf:NAME"},
    )


def build_parser() -> ArgumentParser:
    """The command-line parser over [`ReportArguments`, `ReportImageArguments`]."""
    return ArgumentParser((ReportArguments, ReportImageArguments), prog="python -m evaluation.report",
                          description=__doc__.split("\n\n")[0])


def parse_args(argv=None) -> tuple[ReportArguments, ImageSetArguments]:
    return build_parser().parse(argv)


def main(argv=None) -> dict:
    args, image_args = parse_args(argv)
    names = display_names(args.models, args.names)
    models, processors = {}, {}
    for name, source in zip(names, args.models):
        models[name], processors[name] = load_model(source, device=args.device)
    reference = names[args.models.index(args.reference)] if args.reference in args.models else args.reference
    loaded, skipped = load_image_sets(image_args, seed=args.seed)
    sources = dict(zip(short_names(list(loaded)), loaded.values()))
    total = sum(len(images) for images in sources.values()) + len(skipped)
    report = build_report(models, sources, args.output_dir, ramps=args.ramps, repeats=args.repeats,
                          picture_images=args.picture_images, seed=args.seed, image_processors=processors,
                          skipped=skipped, reference=reference)
    for line in report["headline"].values():
        print(line["sentence"])
    skipped.summarise(total=total)
    print(f"wrote {Path(args.output_dir) / 'report.html'} and report.json")
    return report


if __name__ == "__main__":
    run_command(main)
