"""Files that readers never see half-written: every write goes to a temporary name in the same folder, then one
`os.replace` puts it in place (atomic on POSIX and Windows).

    with atomic_path("summary.json") as temporary:
        temporary.write_text(...)
    write_json_atomic("results.json", {"r2": 0.97})
    save_array_atomic("features.npy", array)
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np


PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block ends without error it replaces `path`.

    The temporary name keeps the suffix (`.name.<random>.tmp.png`), so writers that pick a format from the suffix
    (Pillow, matplotlib, numpy) still work; on error the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _json_default(value: Any):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(path: PathLike, data: Any) -> Path:
    """Write `data` as indented JSON (numpy scalars and arrays, paths converted), atomically; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True), encoding="utf-8")
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def save_array_atomic(path: PathLike, array: np.ndarray) -> Path:
    """`np.save`, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, np.asarray(array))
    return Path(path)
