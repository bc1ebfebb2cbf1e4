"""Publish a converted or distilled model folder: evaluate it, fill its model card, write its demo Space, upload.

    python -m evaluation.publish out/alibi-dinov2-small --base_model facebook/dinov2-with-registers-small
    python -m evaluation.publish out/alibi-dinov2-small --base_model facebook/dinov2-with-registers-small \\
        --push_to_hub --hub_model_id me/alibi-dinov2-small --space_id me/alibi-dinov2-small-demo

1. The positional-bias evaluation on the built-in image sets (`micro`, `textures`, `noise`; any `--images` the probe
   runner takes): the positional linear probe (R^2 of each patch's position predicted from its features, mean +- std
   over images x samplings; `random` is the control) for the model and, with `--base_model`, the stock DINOv2 it
   came from, plus the roll-equivariance check (features of an image rolled by half its grid against the rolled
   features). The numbers go to `FOLDER/evaluation_results.json`.
2. The model card (`FOLDER/README.md`) gets them as Hub evaluation results (`model-index`, shown by the Hub) and as
   a table, with the command that produced them.
3. A Hugging Face Space folder (default `FOLDER-space`, beside the model folder): `app.py` running the project's
   browser demo (`demo/app.py`, copied with the evaluation modules it uses) on the model and its base model,
   `requirements.txt` and a README with the Space metadata naming the model repository.
4. With `--push_to_hub` both are uploaded (the model to `--hub_model_id`, default the folder's name in your
   namespace; the Space to `--space_id`, default `HUB_MODEL_ID-demo`; `--hub_private_repo` makes both
   private). Without it, or with `--dry_run`, nothing is uploaded: the files that would be
   are listed. Steps 1-3 are pure functions over loaded models and folders; the upload is one function, `upload`.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

from alibi_dinov2.cli import ArgumentParser, run_command
from alibi_dinov2.conversion.families import family_of
from alibi_dinov2.conversion.model_card import update_model_card_evaluation
from alibi_dinov2.errors import InputError
from alibi_dinov2.features.preprocessing import DEFAULT_MAX_SIDE
from alibi_dinov2.hub.models import load_model
from alibi_dinov2.hub.sources import check_model_source
from alibi_dinov2.io.files import write_json_atomic, write_text_atomic
from alibi_dinov2.io.image_sets import NamedImage
from alibi_dinov2.io.images import SkippedInputs
from evaluation.positional_probe import PROBE_PROTOCOL
from evaluation.probe_runner import ImageSetArguments, load_image_sets, run_probe
from evaluation.transform_check import transform_check


PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = "evaluation_results.json"
DEFAULT_RAMPS = ("lr+ud", "random")
# What a model folder holds that is no part of the model: training checkpoints and logs, temporary files, caches.
UPLOAD_IGNORE = ["checkpoint-*", ".checkpoint-*", "train_distill/*", "*.tmp", "*.tmp.*", "__pycache__/*", "*.pyc"]
DEMO_ENTRY_MODULES = ("demo.app", "alibi_dinov2.hub.models")
PROJECT_PACKAGES = ("alibi_dinov2", "demo", "evaluation")
DEFAULT_GRADIO_VERSION = "5.0.0"
# How the built-in image sets appear on the Hub's evaluation widget: (dataset_type, readable name).
SOURCE_LABELS = {
    "micro": ("synthetic-micrographs", "synthetic homogeneous micrographs"),
    "textures": ("skimage-textures", "scikit-image textures (brick, grass, gravel)"),
    "noise": ("uniform-noise", "uniform RGB noise"),
}


# --------------------------------------------------------------------------------------------------
# 1. Evaluation
# --------------------------------------------------------------------------------------------------
def evaluate_models(
    models: Mapping[str, tuple[object, object]],
    sources: Mapping[str, Sequence[NamedImage]],
    ramps: Sequence[str] = DEFAULT_RAMPS,
    repeats: int = PROBE_PROTOCOL.repeats,
    seed: int = PROBE_PROTOCOL.seed,
    roll_images: int = 2,
    progress: bool = False,
    skipped: SkippedInputs | None = None,
) -> dict:
    """Positional probe and roll check of every model on every image set.

    Args:
        models: display name -> (model, image statistics or None), as `alibi_dinov2.hub.models.load_model` returns.
        roll_images: the roll check runs on the first this many images of each set.
        skipped: the record of inputs left out (unreadable files, images smaller than a patch), as `run_probe` takes.

    Returns:
        JSON-ready `{"protocol", "images": {set: count}, "scores": {model: {set: {ramp: {mean, std, n}}}},
        "roll": {model: {set: relative L2}}, "skipped", "timings_s": {"probe", "roll"}}`.
    """
    started = time.perf_counter()
    probe = run_probe(
        {name: model for name, (model, _) in models.items()},
        sources,
        ramps=ramps,
        protocol=replace(PROBE_PROTOCOL, repeats=repeats, seed=seed),
        image_processors={name: statistics for name, (_, statistics) in models.items()},
        progress=progress,
        skipped=skipped,
    )
    probed = time.perf_counter()
    roll = {name: {} for name in models}
    for source, images in sources.items():
        errors = transform_check({name: model for name, (model, _) in models.items()},
                                 [image for _, image in images[:roll_images]], transforms=("roll",))
        for name in models:
            roll[name][source] = errors[name]["roll"]
    scores = {
        name: {
            source: {ramp: {key: summary[key] for key in ("mean", "std", "n")} for ramp, summary in per_ramp.items()}
            for source, per_ramp in per_source.items()
        }
        for name, per_source in probe["scores"].items()
    }
    return {
        "protocol": {**probe["protocol"], "roll_images": roll_images, "roll_shift": "half the patch grid"},
        "images": {source: len(described) for source, described in probe["sources"].items()},
        "scores": scores,
        "roll": roll,
        "skipped": probe["skipped"],
        "timings_s": {"probe": probed - started, "roll": time.perf_counter() - probed},
    }


def _source_label(source: str) -> tuple[str, str]:
    name = source.partition(":")[0]
    if name in SOURCE_LABELS:
        return SOURCE_LABELS[name]
    return Path(source).name or source, source


def card_eval_results(evaluation: dict, model: str) -> list:
    """`huggingface_hub.EvalResult`s of `model`: the probe's mean R^2 per image set and ramp, and the roll error."""
    from huggingface_hub import EvalResult

    results = []
    for source, per_ramp in evaluation["scores"][model].items():
        dataset_type, label = _source_label(source)
        dataset_name = f"{source}: {label} ({evaluation['images'][source]} images)"
        common = dict(task_type="image-feature-extraction", dataset_type=dataset_type, dataset_name=dataset_name)
        for ramp, summary in per_ramp.items():
            results.append(EvalResult(
                **common, task_name="Positional bias", metric_type="r_squared",
                metric_name=f"{ramp} R² (mean over images x samplings)", metric_value=round(summary["mean"], 4),
            ))
        results.append(EvalResult(
            **common, task_name="Positional bias", metric_type="relative_l2",
            metric_name="roll error (relative L2)", metric_value=round(evaluation["roll"][model][source], 4),
        ))
    return results


def evaluation_markdown(evaluation: dict, command: str) -> str:
    """The card's evaluation section: a table (one column per model) and the command that measured it."""
    models = list(evaluation["scores"])
    repeats = evaluation["protocol"]["repeats"]
    rows = []
    for source, count in evaluation["images"].items():
        for ramp in evaluation["protocol"]["ramps"]:
            label = f"{ramp} R² (control)" if ramp == "random" else f"{ramp} R²"
            cells = [
                f"{evaluation['scores'][m][source][ramp]['mean']:+.3f} "
                f"± {evaluation['scores'][m][source][ramp]['std']:.3f}"
                for m in models
            ]
            rows.append(f"| {source} ({count}) | {label} | " + " | ".join(cells) + " |")
        roll_count = min(count, evaluation["protocol"]["roll_images"])
        cells = [f"{evaluation['roll'][m][source]:.4f}" for m in models]
        rows.append(f"| {source} ({roll_count}) | roll error | " + " | ".join(cells) + " |")
    header = "| images | measure | " + " | ".join(f"`{m}`" for m in models) + " |"
    return "\n".join([
        "Positional bias: R² of a linear probe (ridge, about one patch in 36 fitted) predicting each patch's position "
        f"from its features, mean ± std over images × {repeats} samplings; features without position score about 0 "
        "or below, and `random` is the control. Roll error: relative L2 distance between the features of an image "
        "rolled by half its patch grid and the rolled features (0: exactly equivariant).",
        "",
        header,
        "|---|---|" + "---|" * len(models),
        *rows,
        "",
        "Measured with:",
        "",
        "```bash",
        command,
        "```",
    ])


# --------------------------------------------------------------------------------------------------
# 3. The Space folder
# --------------------------------------------------------------------------------------------------
def _imported_names(source: Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports included); `from a import b` gives `a` and `a.b`."""
    names = []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def demo_source_files(entry_modules: Sequence[str] = DEMO_ENTRY_MODULES) -> dict[str, Path]:
    """The project's files the demo needs: `entry_modules` and every `alibi_dinov2` / `evaluation` / `demo` module
    they import (at any depth), with the packages' `__init__.py`; `{path in the Space: source file}`."""
    found: dict[str, Path] = {}
    pending = list(entry_modules)
    while pending:
        module = pending.pop()
        relative = module.replace(".", "/") + ".py"
        source = PROJECT_ROOT / relative
        if relative in found or not source.is_file():
            continue
        found[relative] = source
        parts = module.split(".")
        for depth in range(1, len(parts)):  # the packages' __init__.py, down to the module's own package
            package = "/".join(parts[:depth])
            found.setdefault(f"{package}/__init__.py", PROJECT_ROOT / package / "__init__.py")
        pending += [name for name in _imported_names(source) if name.split(".")[0] in PROJECT_PACKAGES]
    return dict(sorted(found.items()))


def declared_requirements() -> list[str]:
    """The project's core and `eval` requirements: from its installed metadata, else from its setup.py."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        lines = requires("alibi-dinov2") or []
    except PackageNotFoundError:
        assignments = {
            node.targets[0].id: node.value
            for node in ast.parse((PROJECT_ROOT / "setup.py").read_text()).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        }
        return ast.literal_eval(assignments["INSTALL_REQUIRES"]) + ast.literal_eval(assignments["EXTRAS"])["eval"]
    return [spec.strip() for spec, _, marker in (line.partition(";") for line in lines)
            if not marker or "extra == \"eval\"" in marker]


def _distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def space_requirements() -> list[str]:
    """`requirements.txt` of the Space: the declared requirements whose packages the demo's files import (gradio
    comes with the Space's SDK, whose version is the README's `sdk_version`)."""
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    imported = {name.split(".")[0] for source in demo_source_files().values() for name in _imported_names(source)}
    used = {_distribution_key(dist) for module in imported for dist in distributions.get(module, ())}
    return [spec for spec in declared_requirements() if _distribution_key(re.split(r"[<>=!~\[ ]", spec)[0]) in used]


def _gradio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        return DEFAULT_GRADIO_VERSION


def space_app(models: Mapping[str, str], max_side: int = DEFAULT_MAX_SIDE) -> str:
    """`app.py` of the Space: the project's demo on `models` (display name -> Hub id or folder), built on import
    (as Gradio Spaces expect a module-level `demo`) and served only when run as a script."""
    return f'''\
"""ALiBi-DINOv2 browser demo: PCA colours, k-means clusters and the positional probe of each model's patch
features on your micrographs, and scribble segmentation with each model's features. Runs the alibi-dinov2 project's
demo (demo/app.py and the project modules it uses, copied beside this file); the models load from the Hub with their
own code (trust_remote_code)."""

from demo.app import build_demo
from alibi_dinov2.hub.models import load_model

MODELS = {json.dumps(dict(models), indent=4)}
MAX_SIDE = {int(max_side)}

demo = build_demo({{name: load_model(source) for name, source in MODELS.items()}}, max_side=MAX_SIDE)

if __name__ == "__main__":
    demo.launch()
'''


def space_readme(models: Mapping[str, str], title: str) -> str:
    """The Space's README: Hugging Face Space metadata (Gradio SDK, `app.py`, the models it runs) and a description."""
    from huggingface_hub import SpaceCardData

    hub_ids = [source for source in models.values() if not Path(source).exists() and "/" in source]
    data = SpaceCardData(
        title=title[:60],
        sdk="gradio",
        sdk_version=_gradio_version(),
        app_file="app.py",
        license="apache-2.0",
        models=hub_ids or None,
        tags=["alibi-dinov2", "dinov2", "image-feature-extraction", "microscopy"],
        emoji="🔬",
        colorFrom="blue",
        colorTo="gray",
        pinned=False,
        short_description="DINOv2 patch features with and without positional bias",
    )
    listed = "\n".join(f"- {name}: `{source}`" for name, source in models.items())
    return f"""---
{data.to_yaml()}
---

# {title}

Drop a micrograph (PNG, JPEG, 8/16-bit TIFF) on the page and compare, for each model, the PCA colours and k-means
clusters of its patch features and how well a linear probe recovers each patch's position (x, y) from them: near 0
means the features describe what a patch shows, not where it sits.

{listed}

Written by `python -m evaluation.publish` of the alibi-dinov2 project; run it locally with `python app.py`.
"""


def write_space_folder(space_dir, models: Mapping[str, str], title: str, max_side: int = DEFAULT_MAX_SIDE) -> Path:
    """Write the Space folder: `app.py`, `requirements.txt`, `README.md` and the project's demo modules."""
    space_dir = Path(space_dir)
    for relative, source in demo_source_files().items():
        write_text_atomic(space_dir / relative, source.read_text(encoding="utf-8"))
    write_text_atomic(space_dir / "app.py", space_app(models, max_side))
    write_text_atomic(space_dir / "requirements.txt", "\n".join(space_requirements()) + "\n")
    write_text_atomic(space_dir / "README.md", space_readme(models, title))
    return space_dir


# --------------------------------------------------------------------------------------------------
# 4. Upload
# --------------------------------------------------------------------------------------------------
@dataclass
class Upload:
    """One folder bound for one Hub repository (`repo_id` None: no repository given, nothing can be uploaded)."""

    folder: Path
    repo_id: str | None
    repo_type: str  # "model" or "space"
    files: list[tuple[str, int]]  # (path in the repository, bytes)


def upload_files(folder) -> list[tuple[str, int]]:
    """The files of `folder` an upload sends (training checkpoints, logs, temporary files and caches left out)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return [
        (path, (folder / path).stat().st_size) for path in filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE)
    ]


def upload_plan(model_dir, space_dir, repo_id: str | None, space_id: str | None) -> list[Upload]:
    return [
        Upload(Path(model_dir), repo_id, "model", upload_files(model_dir)),
        Upload(Path(space_dir), space_id, "space", upload_files(space_dir)),
    ]


def _size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000


def format_plan(plan: Sequence[Upload], private: bool = False, uploading: bool = False) -> str:
    """What the upload sends (or, in a dry run, would send): per repository its files and sizes."""
    lines = []
    for item in plan:
        total = sum(size for _, size in item.files)
        target = (
            f"{item.repo_type} repository {item.repo_id}"
            if item.repo_id
            else f"a {item.repo_type} repository (give --hub_model_id)"
        )
        verb = "uploading to" if uploading else "would upload to"
        lines.append(f"{verb} {target}{' (private)' if private and item.repo_id else ''}: "
                     f"{len(item.files)} files, {_size(total)} from {item.folder}")
        lines += [f"    {path}  {_size(size)}" for path, size in item.files]
    return "\n".join(lines)


def upload(plan: Sequence[Upload], private: bool = False, commit_message: str = "Publish ALiBi-DINOv2") -> list[str]:
    """Upload every folder of the plan (the model first: the Space loads it); returns the repository URLs."""
    from alibi_dinov2.hub.push import push_to_hub

    return [
        push_to_hub(item.folder, item.repo_id, private=private, commit_message=commit_message,
                    ignore_patterns=UPLOAD_IGNORE, repo_type=item.repo_type,
                    space_sdk="gradio" if item.repo_type == "space" else None)
        for item in plan
    ]


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
@dataclass
class PublishArguments:
    """Options of ``python -m evaluation.publish FOLDER``."""

    folder: str = field(metadata={"help": "converted or distilled model folder (its README.md is updated)"})
    base_model: str | None = field(default=None, metadata={"help": "the stock DINOv2 it came from, evaluated beside "
                                                                   "it and shown in the demo (Hub id or folder)"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the model and its Space (without it: a dry "
                                                               "run)"})
    hub_model_id: str | None = field(default=None, metadata={"help": "model repository id, named in the card and the "
                                                                   "Space (default with --push_to_hub: the folder's "
                                                                   "name)"})
    space_id: str | None = field(
        default=None, metadata={"help": "Space repository id; HUB_MODEL_ID-demo when not given"}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "create private repositories"})
    dry_run: bool = field(default=False, metadata={"help": "with --push_to_hub: write everything naming the "
                                                           "repositories, list the upload, send nothing"})
    space_dir: str | None = field(
        default=None, metadata={"help": "where to write the Space; FOLDER-space when not given"}
    )
    ramps: list[str] = field(default_factory=lambda: list(DEFAULT_RAMPS), metadata={"help": "probe ramps"})
    repeats: int = field(default=PROBE_PROTOCOL.repeats, metadata={"help": "probe samplings per image"})
    roll_images: int = field(default=2, metadata={"help": "images per set of the roll check"})
    seed: int = field(default=PROBE_PROTOCOL.seed, metadata={"help": "seed of the samplings and generated image sets"})
    max_side: int = field(
        default=DEFAULT_MAX_SIDE, metadata={"help": "the demo shrinks images to this longer side (pixels)"}
    )
    device: str | None = field(default=None, metadata={"help": "torch device of the evaluation; CPU when not given"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})


@dataclass
class PublishImageArguments(ImageSetArguments):
    images: list[str] = field(
        default_factory=lambda: ["micro", "textures", "noise"],
        metadata={"help": "image sets: micro, textures, noise (optionally NAME:COUNT), an image folder, ..."},
    )


def command_line(*arguments) -> str:
    """The command that reproduces parsed `arguments` (options left at their defaults omitted)."""
    words = ["python", "-m", "evaluation.publish"]
    for options in arguments:
        for option in fields(options):
            value = getattr(options, option.name)
            if option.name == "folder":
                words.insert(3, value)
                continue
            default = option.default_factory() if callable(option.default_factory) else option.default
            if value == default:
                continue
            if isinstance(value, bool):
                words += [f"--{option.name}"] if value else [f"--{option.name}", "false"]
            elif isinstance(value, (list, tuple)):
                words += [f"--{option.name}", *map(str, value)]
            else:
                words += [f"--{option.name}", str(value)]
    return shlex.join(words)


def build_parser() -> ArgumentParser:
    """The command-line parser over [`PublishArguments`, `PublishImageArguments`] (FOLDER may come bare)."""
    return ArgumentParser((PublishArguments, PublishImageArguments), positionals=("folder",),
                          prog="python -m evaluation.publish", description=__doc__.split("\n\n")[0])


def parse_args(argv: Sequence[str] | None = None) -> tuple[PublishArguments, PublishImageArguments]:
    return build_parser().parse(argv)


def publish(args: PublishArguments, image_args: PublishImageArguments | None = None) -> dict:
    """Evaluate, write the card and the Space, then upload or list the upload; returns a summary (also the
    evaluation, the plan and the timings)."""
    image_args = image_args or PublishImageArguments()
    started = time.perf_counter()
    folder = Path(check_model_source(args.folder))
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (no config.json); publish a folder written by "
                         "convert_checkpoint.py or train_distill.py")
    repo_id = args.hub_model_id or (folder.resolve().name if args.push_to_hub else None)
    space_id = args.space_id or (f"{repo_id}-demo" if repo_id else None)
    model_name = repo_id or folder.resolve().name
    models = {model_name: load_model(str(folder), args.device)}
    if args.base_model:
        models[args.base_model] = load_model(args.base_model, args.device)
    sources, skipped = load_image_sets(image_args, seed=args.seed)
    loaded = time.perf_counter()
    evaluation = evaluate_models(models, sources, args.ramps, args.repeats, args.seed, args.roll_images,
                                 progress=not args.no_progress, skipped=skipped)
    evaluation["command"] = command_line(args, image_args)
    evaluated = time.perf_counter()


    update_model_card_evaluation(
        folder,
        table=evaluation_markdown(evaluation, evaluation["command"]),
        eval_results=card_eval_results(evaluation, model_name),
        model_name=model_name,
        repo_id=repo_id,
        base_model=args.base_model,
    )
    carded = time.perf_counter()
    family = family_of(models[model_name][0].config, default="dinov2")  # another model type: named as ALiBi-DINOv2
    space_models = {f"{family.title} ({model_name})": repo_id or str(folder.resolve())}
    if args.base_model:  # a local base model is named by its absolute path, so that the Space runs from anywhere
        base = Path(args.base_model)
        space_models[f"{family.stock_name} ({args.base_model})"] = (
            str(base.resolve()) if base.exists() else args.base_model
        )
    space_dir = Path(args.space_dir) if args.space_dir else folder.resolve().parent / f"{folder.resolve().name}-space"
    write_space_folder(space_dir, space_models, f"{family.title}: {model_name.split('/')[-1]}", args.max_side)
    spaced = time.perf_counter()
    evaluation["timings_s"].update(load=loaded - started, card=carded - evaluated, space=spaced - carded)
    write_json_atomic(folder / RESULTS_FILE, evaluation)

    plan = upload_plan(folder, space_dir, repo_id, space_id)
    pushing = args.push_to_hub and not args.dry_run
    print(format_plan(plan, args.hub_private_repo, uploading=pushing))
    urls = upload(plan, private=args.hub_private_repo) if pushing else []
    evaluation["timings_s"]["total"] = time.perf_counter() - started
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in evaluation["timings_s"].items())
    print(f"evaluated {', '.join(models)} on {', '.join(sources)}; card {folder / 'README.md'}; Space {space_dir}; "
          f"{timings}" + ("" if pushing else "; dry run: nothing uploaded"))
    return {"evaluation": evaluation, "space_dir": space_dir, "plan": plan, "urls": urls, "uploaded": pushing}


def main(argv: Sequence[str] | None = None) -> dict:
    return publish(*parse_args(argv))


if __name__ == "__main__":
    run_command(main)
