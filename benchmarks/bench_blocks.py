"""Peak memory and speed of block-wise classical segmentation (`alibi_dinov2.segmentation.blocks`) against
segmenting the whole image at once.

A classical-feature segmenter (58 channels) is trained on the scribbles of a generated two-phase micrograph, then
segments a generated 16-bit image of `--size` px a side: whole (where `--size <= --whole_max_size`; the feature
stack alone is 232 bytes a pixel) and in blocks of `--block_size` px with 1 and 2 dask threads. Each run is a fresh
process whose peak resident set (ru_maxrss: Python, the libraries, the image and the mask included) is reported
with the resident set before segmenting and its pixels per second. On `--compare_size` px,
where both fit, the block-wise mask is compared with the whole-image one. Target: 8192 x 8192 px with a peak of at
most 4 GiB. JSON on disk.

`--features classical+vit` adds 9 ViT channels from a random ViT-S/14 ALiBi-DINOv2 with 4 registers (the released
models' shape; no download): the patch grid of the whole image in one streamed pass up to `--vit_max_tokens`,
overlapping tiles beyond.

    python benchmarks/bench_blocks.py                               # 8192 px in blocks, 2048 px compared
    python benchmarks/bench_blocks.py --size 4096 --block_size 1024 --workers 1 2
    python benchmarks/bench_blocks.py --features classical+vit --size 2048 --compare_size 1024 --workers 1 2
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parse, write_results  # noqa: E402


GIB = 2**30


@dataclass
class BlockArguments:
    size: int = field(default=8192, metadata={"help": "side of the segmented image (px)"})
    block_size: int = field(default=1024, metadata={"help": "block side (px)"})
    workers: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "dask thread counts"})
    compare_size: int = field(default=2048, metadata={"help": "side where whole and block-wise masks are compared"})
    whole_max_size: int = field(default=4096, metadata={"help": "largest side segmented whole"})
    features: str = field(default="classical", metadata={"help": "classical or classical+vit"})
    vit_max_tokens: int = field(default=65536, metadata={"help": "ViT patches in one pass; tiles beyond"})
    output: str | None = field(default=None, metadata={"help": "JSON file (default benchmarks/results/)"})


def _vit_small():
    """A random ViT-S/14 ALiBi-DINOv2 with 4 registers (the released checkpoints' shape)."""
    import torch

    from configuration_alibi_dinov2 import AlibiDinov2Config
    from modeling_alibi_dinov2 import AlibiDinov2Model

    torch.manual_seed(0)
    return AlibiDinov2Model(AlibiDinov2Config()).eval()


def _segmenter(features: str = "classical"):
    from alibi_dinov2.segmentation.trainable import TrainableSegmenter
    from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset
    from evaluation.scribble_benchmark import simulate_scribble_rounds

    ((image, truth),) = generate_microstructure_dataset(1, size=(256, 256), n_phases=2, seed=0)
    scribbles = simulate_scribble_rounds([truth], n_rounds=3, seed=0)[-1][0]
    model = _vit_small() if features != "classical" else None
    segmenter = TrainableSegmenter(features=features, model=model, feature_backend="numpy")
    return segmenter.fit(np.round(image * 65535).astype(np.uint16), scribbles)


def _image(size: int) -> np.ndarray:
    """A 16-bit two-phase texture of `size` px: smooth noise thresholded, plus noise (fast at any size)."""
    from scipy import ndimage

    rng = np.random.default_rng(size)
    coarse = ndimage.zoom(rng.random((size // 32 + 1, size // 32 + 1), dtype=np.float32), 32, order=1)[:size, :size]
    image = np.where(coarse > 0.5, np.float32(0.7), np.float32(0.3))
    image += 0.05 * rng.standard_normal((size, size), dtype=np.float32)
    return np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)


def _run(mode: str, size: int, block_size: int, workers: int, options: dict, queue) -> None:
    """In a fresh process: segment, and report (seconds, peak resident set, resident set before, mask)."""
    import torch

    from alibi_dinov2.features.large_images import VitTiling

    torch.set_num_threads(workers)
    segmenter, image = _segmenter(options["features"]), _image(size)
    baseline = _resident_bytes()
    started = time.perf_counter()
    if mode == "whole":
        mask = segmenter.predict(image)
    else:
        from alibi_dinov2.segmentation.blocks import segment_in_blocks

        tiling = VitTiling(max_tokens=options["vit_max_tokens"])
        lazy = segment_in_blocks(segmenter, image, block_size, tiling)
        mask = lazy.compute(scheduler="threads", num_workers=workers)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process's, image and model included
    queue.put((seconds, peak, baseline, mask.astype(np.uint8) if size <= 4096 else None))


def _resident_bytes() -> int:
    """This process's resident set now (Linux /proc; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str, size: int, block_size: int = 0, workers: int = 1, options: dict | None = None) -> dict:
    options = options or {"features": "classical", "vit_max_tokens": 65536}
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(mode, size, block_size, workers, options, queue))
    process.start()
    seconds, peak, before, mask = queue.get()
    process.join()
    row = {**options, "mode": mode, "size": size, "block_size": block_size or None, "workers": workers,
           "seconds": seconds, "peak_resident_gib": peak / GIB, "resident_before_gib": before / GIB,
           "megapixels_per_second": size * size / seconds / 1e6}  # fmt: skip
    print(f"{mode:6s} {size:6d} px  block {block_size or '-':>5}  threads {workers}  {seconds:8.1f} s  "
          f"{row['megapixels_per_second']:6.2f} Mpx/s  peak {row['peak_resident_gib']:.2f} GiB "
          f"(image and segmenter loaded: {row['resident_before_gib']:.2f} GiB)")
    return row | {"mask": mask}


def main(argv=None) -> dict:
    (args,) = parse(BlockArguments, argv, __doc__.split("\n\n")[0], "python benchmarks/bench_blocks.py")
    rows = []
    options = {"features": args.features, "vit_max_tokens": args.vit_max_tokens}
    whole = measure("whole", args.compare_size, workers=max(args.workers), options=options)
    blocks = measure("blocks", args.compare_size, args.block_size, max(args.workers), options)
    agreement = float((whole.pop("mask") == blocks.pop("mask")).mean())
    print(f"{args.compare_size} px: block-wise and whole-image masks agree on {agreement:.6%} of the pixels")
    rows += [whole, blocks]
    if args.size <= args.whole_max_size and args.size != args.compare_size:
        rows.append(measure("whole", args.size, workers=max(args.workers), options=options))
    for workers in args.workers:
        rows.append(measure("blocks", args.size, args.block_size, workers, options))
    for row in rows:
        row.pop("mask", None)
    results = {"rows": rows, "mask_agreement": agreement, "compare_size": args.compare_size, **options}
    write_results(results, args.output, "bench_blocks.json")
    return results


if __name__ == "__main__":
    main()
