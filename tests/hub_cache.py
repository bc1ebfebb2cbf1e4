"""An offline Hugging Face Hub cache laid out as huggingface_hub lays it out:

    HF_HUB_CACHE/models--OWNER--REPO/blobs/<sha256>                     the file's bytes
    HF_HUB_CACHE/models--OWNER--REPO/snapshots/<commit>/FILE -> ../../blobs/<sha256>
    HF_HUB_CACHE/models--OWNER--REPO/refs/<revision>                    holding <commit>
"""

import hashlib
import os
from pathlib import Path
from typing import Mapping, Union


def put_in_hub_cache(
    cache: Path,
    repo_id: str,
    files: Mapping[str, Union[Path, bytes]],
    revision: str = "main",
    commit: str | None = None,
    repo_type: str = "model",
) -> Path:
    """Store `files` ({path in the repository: local file or bytes}) at `commit` (default: derived from the
    contents), point `refs/revision` at it, and return the snapshot folder."""
    contents = {name: data if isinstance(data, bytes) else Path(data).read_bytes() for name, data in files.items()}
    commit = commit or hashlib.sha1(b"".join(contents[name] for name in sorted(contents))).hexdigest()
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, data in contents.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def put_folder_in_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Every file of `folder` (a saved model) as repository `repo_id` of the cache."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}
    return put_in_hub_cache(cache, repo_id, files, revision=revision)
