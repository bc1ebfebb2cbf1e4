"""A bounded store of computed feature stacks, so that an image's features are computed once and reused while its
scribbles change (the browser demo; any caller that segments the same image again).

    cache = FeatureCache(max_bytes=4 << 30)
    segmenter = TrainableSegmenter(features="classical+vit", model=model, feature_cache=cache)

Entries are keyed by what determines the features: an image fingerprint (:func:`image_fingerprint`, a hash of the
pixels, their shape and dtype) and the feature settings. The least recently used entries are dropped once the
stored arrays exceed `max_bytes`; an array larger than that is returned without being stored. Stored arrays are
read-only, since every caller shares them. Copies of a cache (``copy.deepcopy``, scikit-learn's ``clone``) are the
cache itself, as a shared store should be.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Hashable

import numpy as np


DEFAULT_MAX_BYTES = 4 << 30


def image_fingerprint(image: np.ndarray) -> str:
    """A hash of an image's pixels, shape and dtype (two images with the same fingerprint hold the same values)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}{array.dtype.str}".encode())
    digest.update(memoryview(array.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


class FeatureCache:
    """Least-recently-used arrays by key, at most `max_bytes` of them; safe to share between threads."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: Hashable, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The array stored under `key`, or `compute()`'s result, stored (read-only) when it fits."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        array = np.asarray(compute())
        if array.nbytes > self.max_bytes:
            return array
        array.flags.writeable = False
        with self._lock:
            self._entries[key] = array
            self._entries.move_to_end(key)
            while self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
        return array

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(array.nbytes for array in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __deepcopy__(self, memo) -> "FeatureCache":
        return self

    def __repr__(self) -> str:
        return f"FeatureCache({len(self)} arrays, {self.nbytes / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MiB)"


__all__ = ["DEFAULT_MAX_BYTES", "FeatureCache", "image_fingerprint"]
