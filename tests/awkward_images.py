"""One folder of awkward image files, the same for every test of every entry point that reads images."""

from pathlib import Path

import numpy as np
from PIL import Image

from alibi_dinov2.io.images import write_image


# Files every reader must take, and the two it must skip (and name).
READABLE = (
    "palette.png",
    "rgba.png",
    "gray.jpg",
    "gray.pgm",
    "depth16.tif",
    "depth12.tif",
    "float32.tif",
    "stack3.tif",
)
CORRUPT, TINY = "corrupt.png", "tiny.png"
SIZE = (84, 112)  # 6 x 8 patches of 14 px: enough for one probe sample at step 6


def _ramp(dtype, peak) -> np.ndarray:
    values = np.linspace(0, peak, SIZE[0] * SIZE[1]).reshape(SIZE)
    return values.astype(dtype)


def write_awkward_images(folder: Path) -> Path:
    """Write the awkward files into `folder` (created) and return it."""
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 4, SIZE, dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    palette.save(folder / "palette.png")
    rgba = rng.integers(0, 256, (*SIZE, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(SIZE[1]) < SIZE[1] // 2, 255, 0)[None, :]
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(_ramp(np.uint8, 255), mode="L").save(folder / "gray.jpg", quality=95)
    Image.fromarray(_ramp(np.uint8, 200), mode="L").save(folder / "gray.pgm")
    tifffile.imwrite(folder / "depth16.tif", _ramp(np.uint16, 65535))
    tifffile.imwrite(folder / "depth12.tif", _ramp(np.uint16, 4095))  # 12-bit data in a 16-bit container
    tifffile.imwrite(folder / "float32.tif", _ramp(np.float32, 3.5) - 1.0)  # outside [0, 1]: min-max scaled
    write_image(folder / "stack3.tif", [_ramp(np.uint16, 1000 * (k + 1)) for k in range(3)])  # 3 pages
    (folder / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    Image.fromarray(np.full((10, 10), 128, np.uint8), mode="L").save(folder / TINY)
    return folder
