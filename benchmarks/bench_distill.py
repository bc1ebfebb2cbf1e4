"""Distillation throughput: training images per second with a live teacher against cached teacher targets.

Each timed step is the training step of `train_distill.py`: targets (the teacher's forward pass, or float16
targets read back from a `--cache_teacher_embeddings` folder), the student's forward and backward pass, and an
AdamW update. Teacher and student are built through `convert_checkpoint` from a random model saved to a temporary
folder, so nothing is downloaded. The cache is filled before timing, as in every epoch after the first.

    python benchmarks/bench_distill.py                                  # tiny model, CPU
    python benchmarks/bench_distill.py --model vit-s --image_size 224 --batch_size 16
    python benchmarks/bench_distill.py --model vit-s --device cuda --batch_size 256 --steps 20

A table goes to stdout and the numbers to JSON (`benchmarks/results/bench_distill-<model>.json` by default).
"""

import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alibi_dinov2.features.preprocessing import normalize  # noqa: E402
from alibi_dinov2.training.data import content_key  # noqa: E402
from alibi_dinov2.training.objective import distillation_loss  # noqa: E402
from alibi_dinov2.training.students import build_student, load_teacher  # noqa: E402
from alibi_dinov2.training.targets import (  # noqa: E402
    TeacherTargetCache,
    batch_targets,
    patch_tokens,
    teacher_fingerprint,
)
from benchmarks.common import parse, write_results  # noqa: E402
from configuration_alibi_dinov2 import AlibiDinov2Config  # noqa: E402
from modeling_alibi_dinov2 import AlibiDinov2Model  # noqa: E402


ARCHITECTURES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56),
    "vit-s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518),
}
MODES = ("live", "cached")


def build_models(model_name: str, folder: Path, device: str):
    """A random stock-layout teacher (learned position embedding) saved to `folder`, then the teacher and the
    ALiBi student read back through the converter, as the training script does."""
    torch.manual_seed(0)
    config = AlibiDinov2Config(
        **ARCHITECTURES[model_name], num_register_tokens=4, use_alibi=False, use_absolute_position_embeddings=True
    )
    AlibiDinov2Model(config).save_pretrained(folder)
    teacher = load_teacher(str(folder)).to(device)
    student = build_student(str(folder), "alibi").to(device)
    return teacher, student


def synthetic_batches(count: int, batch_size: int, image_size: int) -> list[dict]:
    """Smooth random images, normalised, with the content keys the cache uses."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        coarse = torch.rand(batch_size, 3, 8, 8, generator=generator)
        images = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bicubic").clamp(0, 1)
        pixel_values = torch.stack([normalize(image) for image in images])
        keys = torch.stack(
            [torch.frombuffer(bytearray(content_key(p)), dtype=torch.uint8) for p in pixel_values]
        )
        batches.append({"pixel_values": pixel_values, "valid": torch.ones(batch_size, dtype=torch.bool), "key": keys})
    return batches


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(teacher, student, optimizer, batches, cache, device: str) -> list[float]:
    """Seconds per training step over `batches`."""
    seconds = []
    prefix = student.embeddings.num_prefix_tokens
    for batch in batches:
        synchronize(device)
        start = time.perf_counter()
        pixel_values = batch["pixel_values"].to(device)
        targets = batch_targets(teacher, pixel_values, batch["valid"], batch["key"], cache)
        loss = distillation_loss(patch_tokens(student, pixel_values, prefix), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    image_size = args.image_size or (224 if args.model == "vit-s" else 56)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher, student = build_models(args.model, scratch / "teacher", args.device)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
        batches = synthetic_batches(args.warmup + args.steps, args.batch_size, image_size)
        cache = TeacherTargetCache(
            scratch / "cache", teacher_fingerprint(teacher, image_size, "no")
        )
        # Fill the cache (untimed), as the first epoch of a cached run does, and write it to disk.
        for batch in batches:
            pixel_values = batch["pixel_values"].to(args.device)
            batch_targets(teacher, pixel_values, batch["valid"], batch["key"], cache)
        cache.flush()
        cache = TeacherTargetCache(
            scratch / "cache", teacher_fingerprint(teacher, image_size, "no")
        )
        cache_bytes = sum(path.stat().st_size for path in cache.directory.glob("*.safetensors"))

        # Modes alternate step by step, so that drifts of the machine (clock, caches) hit both alike.
        seconds = {mode: [] for mode in MODES}
        for index, batch in enumerate(batches):
            for mode in MODES:
                mode_cache = cache if mode == "cached" else None
                step_seconds = time_steps(teacher, student, optimizer, [batch], mode_cache, args.device)
                if index >= args.warmup:
                    seconds[mode] += step_seconds
        rows = []
        for mode in MODES:
            median = statistics.median(seconds[mode])
            rows.append(
                {
                    "mode": mode,
                    "images_per_second": args.batch_size / median,
                    "ms_per_step": 1000 * median,
                    "step_seconds": seconds[mode],
                }
            )
        if cache.computed:
            raise RuntimeError(f"The cached run computed {cache.computed} targets; the cache should hold them all.")
    rows[1]["speedup"] = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    rows[0]["speedup"] = 1.0
    return {
        "benchmark": "bench_distill",
        "model": args.model,
        "image_size": image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "cache_bytes_per_image": cache_bytes / (len(batches) * args.batch_size),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "results": rows,
    }


def print_table(results: dict) -> None:
    print(
        f"\nbench_distill: {results['model']}, {results['image_size']} px, batch {results['batch_size']}, "
        f"{results['device']}, cache {results['cache_bytes_per_image'] / 1024:.0f} KiB per image"
    )
    print(f"| {'targets':8} | {'images/s':>9} | {'ms/step':>9} | {'speedup':>7} |")
    print(f"|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 9}|")
    for row in results["results"]:
        speed, step, speedup = row["images_per_second"], row["ms_per_step"], row["speedup"]
        print(f"| {row['mode']:8} | {speed:9.1f} | {step:9.1f} | {speedup:6.2f}x |")


@dataclass
class DistillBenchmarkArguments:
    model: Literal["tiny", "vit-s"] = field(
        default="tiny", metadata={"help": "tiny (tests) or vit-s (ViT-S/14, 4 registers)"}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "training image size (default 224 for vit-s, 56 for tiny)"}
    )
    batch_size: int = field(default=16, metadata={"help": "images per step"})
    steps: int = field(default=5, metadata={"help": "timed steps per mode"})
    warmup: int = field(default=1, metadata={"help": "untimed steps per mode"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    output: str | None = field(
        default=None, metadata={"help": "JSON file (default benchmarks/results/bench_distill-MODEL.json)"}
    )


def main(argv=None) -> dict:
    (args,) = parse(DistillBenchmarkArguments, argv, __doc__, "benchmarks/bench_distill.py")
    results = run(args)
    print_table(results)
    write_results(results, args.output, f"bench_distill-{args.model}.json")
    return results


if __name__ == "__main__":
    main()
