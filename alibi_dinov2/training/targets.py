"""TODO docstring for alibi_dinov2.training.targets."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch

from alibi_dinov2.features.extraction import patch_size_of, prefix_token_count
from alibi_dinov2.io.files import write_json_atomic


logger = logging.getLogger(__name__)


# New teacher targets are written to disk once this many bytes are pending (one shard file per flush).
CACHE_SHARD_BYTES = 256 * 2**20


def patch_tokens(model, pixel_values: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Final-normed patch tokens, CLS and registers dropped: `(B, 3, H, W)` -> `(B, h * w, C)`."""
    return model(pixel_values=pixel_values).last_hidden_state[:, num_prefix_tokens:]


@torch.no_grad()
def teacher_patch_targets(teacher, pixel_values: torch.Tensor, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The teacher's final-normed patch tokens, `(B, h * w, C)` float32."""
    with autocast():
        tokens = patch_tokens(teacher, pixel_values, prefix_token_count(teacher))
    return tokens.float()


def blank_target_channels(targets: torch.Tensor, channels) -> torch.Tensor:
    """Set the listed channels of `(..., C)` targets to 0 (a copy; the teacher itself is untouched)."""
    if not len(channels):
        return targets
    targets = targets.clone()
    targets[..., list(channels)] = 0.0
    return targets


def teacher_fingerprint(teacher, image_size: int, mixed_precision: str) -> str:
    """Identifies what the cached targets depend on: every teacher weight, the input size and the precision."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps({"image_size": image_size, "mixed_precision": mixed_precision}).encode())
    return digest.hexdigest()[:20]


class TeacherTargetCache:
    """Teacher targets on disk, float16, one `(h * w, C)` tensor per image keyed by the hex content hash of the
    preprocessed image.

    Layout: `root/<teacher fingerprint>/targets-*.safetensors` shards plus an `info.json`. Every process writes
    its own shards (named with the process index and a random suffix), each written to a temporary name and
    renamed, so that a killed run leaves only complete shards. `refresh()` picks up shards written since (by this
    run's other processes or by other runs).
    """

    def __init__(self, root, fingerprint: str, info: dict | None = None, process_index: int = 0) -> None:
        self.directory = Path(root) / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process_index = process_index
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.hits = 0
        self.computed = 0
        info_path = self.directory / "info.json"
        if info and not info_path.exists():
            write_json_atomic(info_path, info)
        self.refresh()

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def refresh(self) -> None:
        from safetensors import safe_open

        for path in sorted(self.directory.glob("targets-*.safetensors")):
            if path in self._handles:
                continue
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as error:  # a foreign or damaged file: ignore it rather than stop training
                logger.warning("Ignoring unreadable cache shard %s (%s)", path, error)
                continue
            self._handles[path] = handle
            for key in handle.keys():
                self._index.setdefault(key, path)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._pending:
            return self._pending[key]
        path = self._index.get(key)
        return None if path is None else self._handles[path].get_tensor(key)

    def put(self, key: str, target: torch.Tensor) -> None:
        if key in self._pending or key in self._index:
            return
        target = target.detach().to("cpu", torch.float16).contiguous().clone()
        self._pending[key] = target
        self._pending_bytes += target.numel() * target.element_size()
        if self._pending_bytes >= CACHE_SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending targets as one new shard."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"targets-p{self.process_index}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.safetensors"
        temporary = self.directory / f".{name}.tmp"
        save_file(self._pending, str(temporary))
        os.replace(temporary, self.directory / name)
        self._pending.clear()
        self._pending_bytes = 0
        self.refresh()


def batch_targets(
    teacher,
    pixel_values: torch.Tensor,
    valid: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    cache: TeacherTargetCache | None = None,
    blank_channels=(),
    autocast=contextlib.nullcontext,
) -> torch.Tensor:
    """Distillation targets of a batch: the teacher's patch tokens with `blank_channels` zeroed.

    Args:
        pixel_values: `(B, 3, S, S)` normalised images.
        valid: `(B,)` bool; invalid images (unreadable files) get an all-zero target and no teacher pass.
        keys: `(B, 16)` uint8 content hashes, needed with `cache`.
        cache: when given, targets are read from it and only the missing ones are computed (and stored).
            Cached targets are float16: a target is then `teacher(x).half().float()`, whether it was just
            computed or read back, so that every epoch and run sees the same numbers.
    Returns:
        `(B, h * w, C)` float32 on the device of `pixel_values`.
    """
    if cache is None:
        targets = teacher_patch_targets(teacher, pixel_values, autocast)
        return blank_target_channels(targets, blank_channels)
    if keys is None:
        raise ValueError("batch_targets needs the images' content keys to use the cache.")
    batch_size = pixel_values.shape[0]
    valid_list = [True] * batch_size if valid is None else valid.cpu().tolist()
    hex_keys = [bytes(row).hex() for row in keys.cpu().numpy()]
    found = [cache.get(key) if ok else None for key, ok in zip(hex_keys, valid_list)]
    missing = [i for i in range(batch_size) if valid_list[i] and found[i] is None]
    if missing:
        computed = teacher_patch_targets(teacher, pixel_values[missing], autocast).half().cpu()
        for position, i in enumerate(missing):
            found[i] = computed[position]
            cache.put(hex_keys[i], computed[position])
        cache.computed += len(missing)
    cache.hits += sum(valid_list) - len(missing)
    reference = next((t for t in found if t is not None), None)
    if reference is None:  # nothing readable in this batch
        patch_size = patch_size_of(teacher)
        grid = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        reference = torch.zeros(grid, teacher.config.hidden_size, dtype=torch.float16)
    stacked = torch.stack([t if t is not None else torch.zeros_like(reference) for t in found])
    targets = stacked.to(device=pixel_values.device, dtype=torch.float32, non_blocking=True)
    return blank_target_channels(targets, blank_channels)

