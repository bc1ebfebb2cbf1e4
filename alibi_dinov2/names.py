"""Short, unique display names for models and image sets: the last part of a path or Hub id, with parent parts
added only where two names would otherwise collide.

    >>> short_names(["/tmp/run1/student-alibi", "facebook/dinov2-small", "outputs/a/model", "outputs/b/model"])
    ['student-alibi', 'dinov2-small', 'a/model', 'b/model']
"""

from __future__ import annotations

from collections import Counter
from pathlib import PurePath
from typing import Sequence


def _parts(name: str) -> tuple[str, ...]:
    spec, colon, count = str(name).partition(":")  # "noise:20" keeps its count, "hf:NAME" its name
    if colon and spec in ("textures", "micro", "noise"):
        return (str(name),)
    parts = tuple(part for part in PurePath(spec if not colon else str(name)).parts if part not in ("/", ".", ""))
    return parts or (str(name),)


def short_names(names: Sequence[str]) -> list[str]:
    """The shortest trailing path parts that tell `names` apart (duplicates of the same name get `#2`, `#3`)."""
    parts = [_parts(name) for name in names]
    depth = [1] * len(names)
    while True:
        shown = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        counts = Counter(shown)
        grow = [i for i, name in enumerate(shown) if counts[name] > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: Counter = Counter()
    unique = []
    for name in shown:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def display_names(sources: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
    """The names a command shows for its models (`--names`): `names`, one per source, or :func:`short_names`.

    Raises:
        ValueError: `names` does not give one name per source (the message names `--names`).
    """
    if not names:
        return short_names(sources)
    if len(names) != len(sources):
        raise ValueError(f"--names gives {len(names)} names for {len(sources)} models")
    if len(set(names)) != len(names):
        raise ValueError(f"--names must be distinct; got {' '.join(names)}")
    return list(names)


__all__ = ["display_names", "short_names"]
