"""Model sources checked before any Hub call: an existing file or folder, a Hub id (offline, only one in the local
cache) or a file URL; anything else is named in one line ("not found: PATH")."""

from __future__ import annotations

import os
import re
from pathlib import Path

from alibi_dinov2.errors import SourceNotFoundError
from alibi_dinov2.hub.offline import in_offline_hub_cache, offline_reason, work_offline_if_unreachable
from alibi_dinov2.hub.remote_files import is_remote_file


# A Hub repository id: `name` or `owner/name`, letters, digits, `-`, `_`, `.` (no `--` or `..`, as the Hub rules).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json", ".yaml", ".yml")


def check_model_source(name: str | os.PathLike, what: str = "model") -> str:
    """Check, before any Hub call, that `name` is an existing file or folder, a possible Hub id, or a file URL
    (`hf://OWNER/REPO/FILE`, `https://...`; see `alibi_dinov2.hub.remote_files`).

    A name that can only be a path (absolute, `./`, `~`, more than one `/`, a checkpoint suffix) and does not exist,
    or a Hub id that is not in the local cache while the Hub is offline (`HF_HUB_OFFLINE`, or no answer from the Hub:
    see `alibi_dinov2.hub.offline.work_offline_if_unreachable`), raises `SourceNotFoundError("not found: NAME ...")`.

    Returns:
        `name` as a string (with `~` expanded for paths).
    """


    text = str(name)
    if is_remote_file(text):  # hf://OWNER/REPO/FILE and URLs: resolved (and named when missing) by remote_files
        return text
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    is_path = (
        not _REPO_ID.match(text)
        or text.startswith((".", "/", "~"))
        or text.lower().endswith(_FILE_SUFFIXES)
        or "--" in text
        or ".." in text
    )
    if is_path:
        raise SourceNotFoundError(f"not found: {text} (no such file or folder, and not a Hub id)")
    if work_offline_if_unreachable() and not in_offline_hub_cache(text):
        raise SourceNotFoundError(
            f"not found: {text} (no such file or folder, and the Hub id is not in the local cache while "
            f"{offline_reason()})"
        )
    return text
