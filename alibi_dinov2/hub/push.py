"""The project's one way to upload a folder to the Hub (a model repository or a Space)."""

from __future__ import annotations

import logging
import os
from typing import Sequence, Union


logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Folders of a training run inside its output folder (see `alibi_dinov2.training.runs`).
CHECKPOINTS_FOLDER = "checkpoints"
LOGS_FOLDER = "logs"

# What a pushed run folder never holds: checkpoints, tracker logs, temporary and hidden files (files.atomic_path
# writes `.name.<random>.tmp.suffix`, save_checkpoint `.tmp_checkpoint_*`).
PUSH_IGNORE_PATTERNS: tuple[str, ...] = (
    f"{CHECKPOINTS_FOLDER}/",
    f"{LOGS_FOLDER}/",
    ".*",
    "*/.*",
    "*.tmp",
    "*.tmp.*",
)


def push_to_hub(
    folder: PathLike,
    repo_id: str,
    private: bool = False,
    commit_message: str = "Upload run outputs",
    ignore_patterns: Sequence[str] | None = None,
    repo_type: str = "model",
    space_sdk: str | None = None,
) -> str:
    """Upload a folder to the Hub repository `repo_id` (created if needed; a model repository, or a Space with
    `repo_type="space"` and its `space_sdk`); returns its URL. The project's one way to push.

    Checkpoints, tracker logs and temporary or hidden files (:data:`PUSH_IGNORE_PATTERNS`) are never uploaded;
    `ignore_patterns` (`huggingface_hub` patterns, relative to `folder`) leaves out more. Call it on the main
    process only.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    space = {"space_sdk": space_sdk} if space_sdk else {}
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, **space)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type=repo_type,
        commit_message=commit_message,
        ignore_patterns=[*PUSH_IGNORE_PATTERNS, *(ignore_patterns or ())],
    )
    logger.info("Pushed %s to %s", folder, url)
    return str(url)
