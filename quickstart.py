"""Quickstart: watch positional bias appear in a DINOv2 and disappear after the ALiBi retrofit, offline, on a CPU.

    python quickstart.py                      # about a minute on 2 CPU cores; writes outputs/quickstart/

By default the teacher is SYNTHETIC: a small DINOv2 with random content weights whose position embedding does two
things, set by hand: smooth 2D ramps make its features leak patch positions the way pretrained DINOv2 features do,
and codes read by its queries and keys make every patch attend to its neighbourhood, so that its features depend on
the patches around each one. No pretrained weights are needed, and the whole method runs for real on it:

1. the teacher is written as a transformers folder and read back through `convert_checkpoint.py`;
2. an ALiBi student and a NoPE student are distilled from it with `train_distill.py` on generated microstructures
   and crops of scikit-image's bundled textures;
3. `evaluation.report` compares teacher and students on held-out images: `report.html`, `report.json`, PNGs.

Both students lose the positional leak. The ALiBi student, whose distance bias can reproduce the teacher's attention
to neighbours, keeps more of the teacher's features than the NoPE student, a bag of patches (held-out patch cosine
about 0.99 vs 0.84): why the paper prefers ALiBi.

The real thing is the same command with a pretrained teacher and your images:

    python quickstart.py --teacher facebook/dinov2-with-registers-small --train_dir my_micrographs/ \\
        --image_size 224 --max_train_steps 20000 --learning_rate 1e-4 --per_device_train_batch_size 64
"""

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import train_distill
from evaluation.cli import ArgumentParser, check_model_source, run_command
from evaluation.files import write_json_atomic
from evaluation.image_io import to_float01


SYNTHETIC_NOTE = (
    "SYNTHETIC TEACHER: a small DINOv2 with random content weights, wired by hand: its position embedding holds "
    "smooth 2D ramps (the positional leak of pretrained DINOv2 features) and codes that make every patch attend to "
    "its neighbourhood (an ALiBi-like distance bias, so its features depend on the patches around each one). It is "
    "not a pretrained model and its features carry no semantics."
)
# Homogeneous textures only: a held-out image whose content itself varies with position (a scene, a lone cell, an
# illumination gradient) gives a content-faithful model a positional R^2 above 0.
TEXTURE_IMAGES = ("brick", "grass", "gravel")
VARIANTS = ("alibi", "nope")
# Generated microstructures: grain size as a fraction of the image side, so that held-out images of any size show
# structure at the scale of the teacher's neighbourhood.
GRAIN_FRACTION = (0.1, 0.35)

# The synthetic teacher's attention logit between patches is about -TEACHER_SLOPE * (|dx| + |dy|) / grid: the bias
# of wrapped, normalised, Manhattan ALiBi with this slope. Its ALiBi student starts from the same bias
# (STUDENT_ALIBI_OPTIONS, learned slopes initialised to TEACHER_SLOPE); a NoPE student has no way to model it.
TEACHER_SLOPE = 14.0
TEACHER_HARMONICS = (1, 3)
STUDENT_ALIBI_OPTIONS = {"alibi_metric": "manhattan", "alibi_slopes": "learned"}
# The synthetic teacher's check: ALiBi's held-out patch cosine to the teacher beats NoPE's by at least this much
# (measured with seeds 0, 1, 2: 0.14, 0.07, 0.14 at the default settings; 0.21, 0.12, 0.15 in the reduced test).
COSINE_MARGIN = 0.05


# --- synthetic teacher ---------------------------------------------------------------------------------------------


def smooth_position_embedding(grid: int, hidden_size: int, amplitude: float, channels: int = 8) -> torch.Tensor:
    """A position embedding `(1, 1 + grid * grid, hidden_size)` whose first `channels` channels hold cosines and
    sines of smooth left-right and up-down ramps (angles, so that LayerNorm cannot wash them out); zero elsewhere,
    and zero at the CLS position."""
    ramp = torch.linspace(0.0, 1.0, grid)
    x = ramp[None, :].expand(grid, grid).reshape(-1)
    y = ramp[:, None].expand(grid, grid).reshape(-1)
    embedding = torch.zeros(1, 1 + grid * grid, hidden_size)
    for index in range(channels // 4):
        frequency = (index + 1) * math.pi / 2
        for offset, coordinate in enumerate((x, y)):
            embedding[0, 1:, 4 * index + 2 * offset] = amplitude * torch.cos(frequency * coordinate)
            embedding[0, 1:, 4 * index + 2 * offset + 1] = amplitude * torch.sin(frequency * coordinate)
    return embedding


def periodic_position_code(grid: int, harmonics=TEACHER_HARMONICS) -> torch.Tensor:
    """`(grid * grid, 4 * len(harmonics))`: for each harmonic k, cos and sin of 2 pi k x, then of 2 pi k y, with
    x, y = column, row / grid. Dot products of two patches' codes depend only on their wrapped offset."""
    steps = torch.arange(grid) / grid
    x = steps[None, :].expand(grid, grid).reshape(-1)
    y = steps[:, None].expand(grid, grid).reshape(-1)
    angles = [2 * math.pi * k * coordinate for k in harmonics for coordinate in (x, y)]
    return torch.stack([f(angle) for angle in angles for f in (torch.cos, torch.sin)], dim=1)


def distance_bias_coefficients(slope: float, harmonics=TEACHER_HARMONICS) -> list[float]:
    """Weights a_k such that sum_k a_k (cos 2 pi k u - 1) ~ -slope |u| for wrapped offsets u in [0, 1/2]: the ALiBi
    bias along one axis as a short cosine series (least squares, weighted by the attention exp(-slope u))."""
    u = np.linspace(0.0, 0.5, 501)
    weight = np.exp(-slope * u / 2)
    basis = np.stack([np.cos(2 * np.pi * k * u) - 1 for k in harmonics], axis=1)
    return np.linalg.lstsq(basis * weight[:, None], -slope * u * weight, rcond=None)[0].tolist()


def build_synthetic_teacher(
    folder,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 2,
    grid: int = 8,
    slope: float = TEACHER_SLOPE,
    mix: float = 2.0,
    seed: int = 0,
):
    """Write a synthetic teacher (a stock `Dinov2WithRegistersModel`, 4 registers) to `folder` and return it.

    Its features leak position and depend on each patch's neighbourhood. Random weights, then, by hand:

    * position embedding (stored for a `grid x grid` input, the training grid): 8 channels of smooth ramps (the
      leak), the periodic code of `periodic_position_code`, and the negatives of both, so that every token's
      channel mean stays 0 and LayerNorm does not smear position over the other channels;
    * queries and keys read only the code, so that the attention logit between two patches is
      `sum_k a_k [cos 2 pi k dx + cos 2 pi k dy]`, i.e. about `-slope * (|dx| + |dy|) / grid` (wrapped offsets):
      every patch attends to its neighbourhood, as ALiBi would. The CLS and register tokens carry a marker channel
      that gives them a large negative logit, as their zero ALiBi bias does not keep them out;
    * values, outputs and MLPs read and write only the other (content) channels; each layer adds about `mix`
      times the patch's content, averaged over its neighbourhood;
    * a constant pair of channels (+S, -S, the patch-embedding bias) dominates every token's LayerNorm scale, so
      that the attention width and the ramps do not vary from patch to patch, nor when a student drops the
      position embedding;
    * the final LayerNorm shows the ramps and the content channels only.
    """
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        patch_size=14,
        image_size=14 * grid,
        num_register_tokens=4,
    )
    model = Dinov2WithRegistersModel(config).eval()
    code = periodic_position_code(grid)
    ramps = 8  # the channels of smooth_position_embedding
    positional = ramps + code.shape[1]  # ramps and code; their negatives follow
    code_channels = slice(ramps, positional)
    stabiliser, marker = 2 * positional, 2 * positional + 2
    reserved = slice(0, marker + 1)  # every channel but the content ones
    # The residual stream runs at 10x DINOv2's initial scale, so that a step of the students' optimiser is small.
    gain, stabiliser_value, ramp_value, code_value, marker_value = 10.0, 320.0, 5.0, 10.0, 80.0
    head_dim = hidden_size // num_attention_heads
    stabiliser_gain = 0.05  # norm1's weight on the stabiliser: enough for the marker logit, too little to matter
    with torch.no_grad():
        embedding = smooth_position_embedding(grid, hidden_size, ramp_value, channels=ramps)
        embedding[0, 1:, code_channels] = code_value * code
        embedding[0, :, positional : 2 * positional] = -embedding[0, :, :positional]
        # LayerNorm's divisor for a patch token, and the LayerNorm'd stabiliser and marker (of a prefix token)
        scale = math.sqrt((2 * stabiliser_value**2 + embedding[0, 1:].pow(2).sum(-1).mean().item()) / hidden_size)
        normed_stabiliser, normed_marker = stabiliser_gain * stabiliser_value / scale, math.sqrt(hidden_size)
        embeddings = model.embeddings
        embeddings.position_embeddings.copy_(embedding)
        embeddings.patch_embeddings.projection.weight.mul_(gain)
        embeddings.patch_embeddings.projection.weight[reserved] = 0
        embeddings.patch_embeddings.projection.bias[stabiliser] = stabiliser_value
        embeddings.patch_embeddings.projection.bias[stabiliser + 1] = -stabiliser_value
        embeddings.cls_token[..., reserved] = 0
        embeddings.cls_token[..., marker] = marker_value
        embeddings.register_tokens[..., marker] = marker_value
        # query . key / sqrt(head_dim): a_k per code pair; -30 from a patch to a prefix token
        coefficients = distance_bias_coefficients(slope)
        code_weights = [math.sqrt(abs(a) * math.sqrt(head_dim)) * scale / code_value for a in coefficients]
        marker_weight = math.sqrt(30.0 * math.sqrt(head_dim) / (normed_stabiliser * normed_marker))
        for layer in model.encoder.layer:
            attention = layer.attention
            attention.q_proj.weight.zero_()
            attention.k_proj.weight.zero_()
            for head in range(num_attention_heads):
                rows = head * head_dim
                for index in range(code.shape[1]):
                    weight, sign = code_weights[index // 4], math.copysign(1.0, coefficients[index // 4])
                    attention.q_proj.weight[rows + index, ramps + index] = weight
                    attention.k_proj.weight[rows + index, ramps + index] = sign * weight
                attention.q_proj.weight[rows + head_dim - 1, stabiliser] = marker_weight
                attention.k_proj.weight[rows + head_dim - 1, marker] = -marker_weight
            layer.norm1.weight[reserved] = 0
            layer.norm1.weight[code_channels] = 1
            layer.norm1.weight[stabiliser] = stabiliser_gain
            layer.norm1.weight[marker] = 1
            layer.norm2.weight[reserved] = 0
            torch.nn.init.normal_(attention.v_proj.weight, std=hidden_size**-0.5)
            torch.nn.init.normal_(attention.o_proj.weight, std=mix * scale * hidden_size**-0.5)
            layer.mlp.fc1.weight.mul_(scale / gain / (0.02 * math.sqrt(hidden_size)))
            layer.mlp.fc2.weight.mul_(gain)
            for reader in (attention.v_proj, layer.mlp.fc1):
                reader.weight[:, reserved] = 0
            for writer in (attention.o_proj, layer.mlp.fc2):
                writer.weight[reserved] = 0
        model.layernorm.weight[ramps : marker + 1] = 0
    folder = Path(folder)
    model.save_pretrained(folder)
    (folder / "README.md").write_text(f"# Synthetic DINOv2 teacher\n\n{SYNTHETIC_NOTE}\n", encoding="utf-8")
    return model


# --- images --------------------------------------------------------------------------------------------------------


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (to_float01(image, method="minmax") * 255).astype(np.uint8)


def _bundled_image(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def generated_images(count: int, size: int, seed: int) -> list[np.ndarray]:
    """`count` homogeneous grayscale uint8 images of `size x size`: synthetic microstructures (2 to 4 phases, grains
    of 10 to 35% of the side, noise) and random crops of scikit-image's bundled textures."""
    from evaluation.synthetic import generate_microstructure

    rng = np.random.default_rng(seed)
    bundled = [_bundled_image(name) for name in TEXTURE_IMAGES]
    images = []
    for index in range(count):
        if index % 2 == 0:
            image, _ = generate_microstructure(
                size=(size, size),
                n_phases=int(rng.integers(2, 5)),
                seed=int(rng.integers(1 << 31)),
                noise=float(rng.uniform(0.0, 0.1)),
                grain_size=float(rng.uniform(*GRAIN_FRACTION)) * size,
            )
        else:
            source = bundled[int(rng.integers(len(bundled)))]
            crop = min(source.shape[0], source.shape[1], int(rng.integers(size, 2 * size + 1)))
            top = int(rng.integers(source.shape[0] - crop + 1))
            left = int(rng.integers(source.shape[1] - crop + 1))
            patch = Image.fromarray(_to_uint8(source[top : top + crop, left : left + crop]))
            image = np.asarray(patch.resize((size, size), Image.BICUBIC))
            image = np.rot90(image, int(rng.integers(4)))
        images.append(_to_uint8(image))
    return images


def write_images(folder, images) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"image_{index:04d}.png")
    return folder


# --- the run -------------------------------------------------------------------------------------------------------


def synthetic_alibi_start(teacher: str, folder: Path) -> Path:
    """The ALiBi student's starting point for the synthetic teacher: the teacher converted to ALiBi with the bias its
    attention imitates (wrapped, normalised Manhattan distance; learned slopes, starting at TEACHER_SLOPE)."""
    from convert_checkpoint import convert, save_model_folder

    model = convert(teacher, variant="alibi", **STUDENT_ALIBI_OPTIONS)
    with torch.no_grad():
        model.encoder.alibi.slopes.fill_(TEACHER_SLOPE)
    return save_model_folder(model, folder)


def distill(
    args: "QuickstartArguments", teacher: str, variant: str, train_dir: Path, probe_dir: Path, init_from=None
) -> Path:
    """Distil one student (from `init_from` if given, else from the teacher) with the real training script; returns
    its output folder."""
    output = args.output_dir / f"student-{variant}"
    train_distill.train(
        train_distill.DistillationArguments(
            teacher=teacher,
            variant=variant,
            init_from=None if init_from is None else str(init_from),
            train_dir=str(train_dir),
            probe_dir=str(probe_dir),
            output_dir=str(output),
            image_size=args.image_size,
            per_device_train_batch_size=args.per_device_train_batch_size,
            max_train_steps=args.max_train_steps,
            learning_rate=args.learning_rate,
            probe_every_n_steps=max(1, args.max_train_steps // 3),
            probe_image_size=args.probe_image_size,
            blank_channels=args.blank_channels,
            dataloader_num_workers=0,
            report_to=args.report_to,
            seed=args.seed,
        )
    )
    return output


def student_cosines(student_dir: Path) -> tuple[float | None, float | None]:
    """First and last held-out patch cosine to the teacher recorded by the training run."""
    summary = json.loads((student_dir / "train_summary.json").read_text())
    history = [entry for entry in summary.get("evaluations", []) if "patch_cosine_to_teacher" in entry]
    if not history:
        return None, None
    return history[0]["patch_cosine_to_teacher"], history[-1]["patch_cosine_to_teacher"]


def final_cosines(cosines: dict) -> tuple[float | None, float | None]:
    """The ALiBi and NoPE students' last held-out patch cosines to the teacher (None for a student not distilled)."""
    return cosines.get("alibi", (None, None))[1], cosines.get("nope", (None, None))[1]


def neighbourhood_note(cosines: dict) -> str | None:
    """What the synthetic teacher shows about ALiBi and NoPE, with the held-out cosines (None without both)."""
    alibi, nope = final_cosines(cosines)
    if alibi is None or nope is None:
        return None
    return (
        "The synthetic teacher's features depend on each patch's neighbourhood. The ALiBi student's distance bias "
        f"can model that; the NoPE student, a bag of patches, cannot: held-out patch cosine to the teacher {alibi:.3f} "
        f"(ALiBi) vs {nope:.3f} (NoPE). In the PCA pictures ALiBi's colours change smoothly across boundaries as the "
        "teacher's do; NoPE's change patch by patch."
    )


def acceptance(report: dict, cosines: dict, source: str, synthetic: bool) -> dict:
    """The quickstart's checks: the teacher leaks position, the students do not, and they learned content; with the
    synthetic teacher, the ALiBi student also keeps more of it than the NoPE student (the neighbourhood)."""
    summary = report["summary"]
    checks = {"teacher lr+ud R^2 >= 0.8": summary["teacher"][source]["lr+ud"]["mean"] >= 0.8}
    for variant, (first, last) in cosines.items():
        checks[f"{variant} student lr+ud R^2 <= 0.1"] = summary[variant][source]["lr+ud"]["mean"] <= 0.1
        if first is not None:
            checks[f"{variant} patch cosine to teacher improves ({first:.3f} -> {last:.3f})"] = last > first
    alibi, nope = final_cosines(cosines)
    if synthetic and alibi is not None and nope is not None:
        checks[f"alibi keeps more of the teacher than nope: held-out patch cosine {alibi:.3f} vs {nope:.3f} "
               f"(margin >= {COSINE_MARGIN})"] = alibi >= nope + COSINE_MARGIN
    return checks


@dataclass
class QuickstartArguments:
    """The quickstart's options; `--help` lists them."""

    output_dir: Path = field(default=Path("outputs/quickstart"), metadata={"help": "folder of everything written"})
    teacher: str = field(default="synthetic", metadata={"help": "`synthetic`, a Hub id, a folder or a .pth"})
    train_dir: Path | None = field(default=None, metadata={"help": "training images (None: generated)"})
    probe_dir: Path | None = field(default=None, metadata={"help": "held-out images (None: generated)"})
    num_train_images: int = field(default=128, metadata={"help": "generated training images"})
    num_probe_images: int = field(default=4, metadata={"help": "generated held-out images"})
    probe_image_size: int = field(default=518, metadata={"help": "side of the held-out images"})
    image_size: int = field(default=112, metadata={"help": "training crop size"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "training images per batch"})
    max_train_steps: int = field(default=150, metadata={"help": "training steps per student"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    blank_channels: list[str] = field(default_factory=lambda: ["auto"], metadata={"help": "as train_distill.py"})
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": "students to distil", "choices": VARIANTS}
    )
    repeats: int = field(default=6, metadata={"help": "probe samplings per image in the report"})
    report_to: str = field(default="none", metadata={"help": "training tracker (as train_distill.py)"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic teacher, the images and the training"})


def parse_args(argv=None) -> QuickstartArguments:
    """Parse command-line tokens (`None`: `sys.argv[1:]`), a JSON or YAML config file first if given."""
    (args,) = ArgumentParser(QuickstartArguments, prog="quickstart.py", description=__doc__).parse(argv)
    return args


def main(argv=None) -> dict:
    """Run the quickstart; returns the report (with its `acceptance` checks)."""
    args = parse_args(argv)
    if args.teacher != "synthetic":
        check_model_source(args.teacher)  # before any work, and before any Hub call
    from convert_checkpoint import convert
    from evaluation.probe_runner import load_image_source, load_model
    from evaluation.report import build_report

    args.output_dir.mkdir(parents=True, exist_ok=True)
    stages = tqdm(total=3 + len(args.variants), desc="quickstart", unit="stage")
    synthetic = args.teacher == "synthetic"
    teacher = str(args.output_dir / "teacher-synthetic") if synthetic else args.teacher
    if synthetic:
        build_synthetic_teacher(teacher, grid=args.image_size // 14, seed=args.seed)
    stages.update(1)

    train_dir = args.train_dir or write_images(
        args.output_dir / "data" / "train", generated_images(args.num_train_images, 2 * args.image_size, args.seed)
    )
    probe_dir = args.probe_dir or write_images(
        args.output_dir / "data" / "heldout",
        generated_images(args.num_probe_images, args.probe_image_size, args.seed + 1),
    )
    stages.update(1)

    students, cosines = {}, {}
    for variant in args.variants:
        stages.set_postfix_str(f"distilling {variant}")
        start = None
        if synthetic and variant == "alibi":
            start = synthetic_alibi_start(teacher, args.output_dir / "student-alibi-start")
        students[variant] = distill(args, teacher, variant, train_dir, probe_dir, init_from=start)
        cosines[variant] = student_cosines(students[variant])
        stages.update(1)

    stages.set_postfix_str("report")
    models = {"teacher": convert(teacher, variant="keep-pe")}
    for variant, folder in students.items():
        models[variant], _ = load_model(str(folder))
    heldout = "held-out"
    sources = {
        heldout: load_image_source(str(probe_dir)),
        "noise": load_image_source("noise:2", size=(args.probe_image_size, args.probe_image_size)),
    }
    notes = [SYNTHETIC_NOTE, neighbourhood_note(cosines)] if synthetic else []
    notes = [note for note in notes if note]
    report = build_report(models, sources, args.output_dir, repeats=args.repeats, seed=args.seed,
                          title="alibi-dinov2 quickstart", notes=notes, reference="teacher")
    stages.update(1)
    stages.close()

    checks = acceptance(report, cosines, heldout, synthetic)
    report["acceptance"] = checks
    report["student_cosine_to_teacher"] = {v: {"first": c[0], "last": c[1]} for v, c in cosines.items()}
    write_json_atomic(args.output_dir / "report.json", report)
    print()
    for line in report["headline"].values():
        print(f"  {line['sentence']}")
    for check, passed in checks.items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {check}")
    print(f"\nreport: {args.output_dir / 'report.html'}")
    return report


if __name__ == "__main__":
    sys.exit(0 if all(run_command(main).get("acceptance", {}).values()) else 1)
