"""Quickstart: watch positional bias appear in a DINOv2 and disappear after the ALiBi retrofit, offline, on a CPU.

    python quickstart.py                      # about 5 minutes on 2 CPU cores; writes outputs/quickstart/

By default the teacher is SYNTHETIC: a small DINOv2 with random weights whose learned position embedding is set by
hand to smooth 2D ramps, so that its features leak patch positions the way pretrained DINOv2 features do. No
pretrained weights are needed, and the whole method runs for real on it:

1. the teacher is written as a transformers folder and read back through `convert_checkpoint.py`;
2. an ALiBi student and a NoPE student are distilled from it with `train_distill.py` on generated microstructures
   and crops of scikit-image's bundled textures and micrographs;
3. `evaluation.report` compares teacher and students on held-out images: `report.html`, `report.json`, PNGs.

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
    "SYNTHETIC TEACHER: a small DINOv2 with random weights whose position embedding was set by hand to smooth 2D "
    "ramps. It reproduces the positional leak of pretrained DINOv2 features for demonstration; it is not a "
    "pretrained model and its features carry no semantics."
)
TEXTURE_IMAGES = ("brick", "grass", "gravel", "cell", "camera", "coins")
VARIANTS = ("alibi", "nope")


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


def build_synthetic_teacher(
    folder,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 2,
    grid: int = 16,
    amplitude: float = 8.0,
    seed: int = 0,
):
    """Write a synthetic positional-bias teacher (a `Dinov2WithRegistersModel`, 4 registers) to `folder`."""
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
    with torch.no_grad():
        model.embeddings.position_embeddings.copy_(smooth_position_embedding(grid, hidden_size, amplitude))
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
    """`count` grayscale uint8 images of `size x size`: synthetic microstructures (2 to 4 phases, random grain size,
    noise, illumination and focus gradients) and random crops of scikit-image's bundled textures and micrographs."""
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
                illumination=float(rng.uniform(0.0, 0.3)),
                blur=float(rng.uniform(0.0, 1.0)),
                grain_size=float(rng.uniform(6.0, 24.0)),
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


def distill(args: "QuickstartArguments", teacher: str, variant: str, train_dir: Path, probe_dir: Path) -> Path:
    """Distil one student with the real training script; returns its output folder."""
    output = args.output_dir / f"student-{variant}"
    train_distill.train(
        train_distill.DistillationArguments(
            teacher=teacher,
            variant=variant,
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


def acceptance(report: dict, cosines: dict, source: str) -> dict:
    """The quickstart's checks: the teacher leaks position, the students do not, and they learned content."""
    summary = report["summary"]
    checks = {
        "teacher lr+ud R^2 >= 0.8": summary["teacher"][source]["lr+ud"]["mean"] >= 0.8,
        "ALiBi student lr+ud R^2 <= 0.1": summary["alibi"][source]["lr+ud"]["mean"] <= 0.1,
    }
    for variant, (first, last) in cosines.items():
        if first is not None:
            checks[f"{variant} patch cosine to teacher improves ({first:.3f} -> {last:.3f})"] = last > first
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
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
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
        build_synthetic_teacher(teacher, seed=args.seed)
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
        students[variant] = distill(args, teacher, variant, train_dir, probe_dir)
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
    notes = [SYNTHETIC_NOTE] if synthetic else []
    report = build_report(models, sources, args.output_dir, repeats=args.repeats, seed=args.seed,
                          title="alibi-dinov2 quickstart", notes=notes)
    stages.update(1)
    stages.close()

    checks = acceptance(report, cosines, heldout) if "alibi" in students else {}
    report["acceptance"] = checks
    report["student_cosine_to_teacher"] = {v: {"first": c[0], "last": c[1]} for v, c in cosines.items()}
    write_json_atomic(args.output_dir / "report.json", report)
    print()
    for model, by_source in report["summary"].items():
        scores = ", ".join(f"{source} {values['lr+ud']['mean']:+.2f}" for source, values in by_source.items())
        print(f"  {model:>8}: positional probe lr+ud R^2: {scores}")
    for check, passed in checks.items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {check}")
    print(f"\nreport: {args.output_dir / 'report.html'}")
    return report


if __name__ == "__main__":
    sys.exit(0 if all(run_command(main).get("acceptance", {}).values()) else 1)
