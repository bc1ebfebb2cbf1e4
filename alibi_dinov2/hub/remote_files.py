"""Checkpoint files named by URL, fetched once into a cache and read from there.

* Hub files: `hf://OWNER/REPO/PATH/IN/REPO` (huggingface_hub's file-system form; `hf://OWNER/REPO@REVISION/...`,
  `hf://datasets/...` and `hf://spaces/...` too) and Hub file URLs `https://huggingface.co/OWNER/REPO/resolve/REV/FILE`
  or `.../blob/REV/FILE`: fetched with `huggingface_hub.hf_hub_download` into the standard Hub cache
  (`HF_HUB_CACHE`), at `revision` when given.
* Plain `https://` (or `http://`) URLs, such as Meta's DINOv2 weights: downloaded once into torch.hub's checkpoint
  cache (`$TORCH_HOME/hub/checkpoints/FILE`, where `torch.hub.load` puts the same files), then read from there.

With `HF_HUB_OFFLINE=1` a cached file is used and an uncached one raises `SourceNotFoundError` with one line that
names the file and says it is not in the cache. `sha256` checks the file (cached or just downloaded) against the
expected digest.

    path = fetch_file("hf://rmdocherty/dino-saw/alibi_coco_dv2_vits14_reg4.pth")
    path = fetch_file("https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
                      sha256="...")
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from alibi_dinov2.errors import InputError, SourceNotFoundError
from alibi_dinov2.hub.offline import hub_offline, offline_reason, work_offline_if_unreachable


HUB_HOSTS = ("huggingface.co", "hf.co")
_REPO_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteFile:
    """A file named by URL: on the Hub (`repo_id`, `filename`, `revision` as written in the URL) or anywhere else
    (`repo_id` None)."""

    url: str
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    repo_type: str = "model"

    @property
    def on_hub(self) -> bool:
        return self.repo_id is not None


def _hub_hosts() -> set[str]:
    from huggingface_hub import constants

    return {*HUB_HOSTS, urlparse(constants.ENDPOINT).netloc}


def _split_repo(parts: list[str], url: str) -> tuple[str, list[str]]:
    """(repo_type, parts without the `datasets/` or `spaces/` prefix); at least OWNER and REPO must follow."""
    repo_type = "model"
    if parts and parts[0] in _REPO_TYPE_PREFIXES:
        repo_type, parts = _REPO_TYPE_PREFIXES[parts[0]], parts[1:]
    if len(parts) < 2 or not all(parts[:2]):
        raise InputError(f"{url}: a Hub file is named OWNER/REPO/FILE")
    return repo_type, parts


def parse_remote_file(source) -> RemoteFile | None:
    """The URL `source` names, or None when it is no URL (a local path or a Hub model id).

    Raises:
        InputError: an `hf://` or Hub URL that names no file in a repository.
    """
    text = str(source)
    if text.startswith("hf://"):
        repo_type, parts = _split_repo(text[len("hf://") :].split("/"), text)
        owner, name, *path = parts
        name, _, revision = name.partition("@")
        if not path or not path[-1]:
            raise InputError(f"{text} names a repository, not a file: write hf://OWNER/REPO/FILE (or give OWNER/REPO "
                             "for a transformers model)")
        return RemoteFile(text, f"{owner}/{name}", "/".join(path), unquote(revision) or None, repo_type)
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    parts = unquote(parsed.path).strip("/").split("/")
    if parsed.netloc in _hub_hosts() and len(parts) >= 3:
        repo_type, parts = _split_repo(parts, text)
        owner, name, *rest = parts
        if len(rest) >= 3 and rest[0] in ("resolve", "blob"):
            return RemoteFile(text, f"{owner}/{name}", "/".join(rest[2:]), rest[1], repo_type)
    return RemoteFile(text)


def is_remote_file(source) -> bool:
    """Whether `source` is an `hf://` name or an http(s) URL (never touches the network)."""
    text = str(source)
    return text.startswith(("hf://", "https://", "http://"))


def url_cache_path(url: str) -> Path:
    """Where a plain URL's file is kept: torch.hub's checkpoint folder, under the URL's file name."""
    import torch.hub

    name = Path(unquote(urlparse(url).path)).name
    if not name:
        raise InputError(f"{url}: the URL names no file")
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path, expected: str, source) -> None:
    """Raise InputError naming `source` when the file's SHA-256 is not `expected`."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise InputError(f"{source}: SHA-256 of {path} is {actual}, not the expected {expected.lower()}")


def _fetch_hub_file(remote: RemoteFile, revision: str | None, cache_dir) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if revision and remote.revision and revision != remote.revision:
        raise InputError(f"{remote.url} names revision {remote.revision!r}, but --revision is {revision!r}")
    revision = revision or remote.revision
    where = f"{remote.repo_id} at revision {revision or 'main'}"
    try:
        return Path(
            hf_hub_download(
                remote.repo_id,
                remote.filename,
                repo_type=remote.repo_type,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=work_offline_if_unreachable(),
            )
        )
    except LocalEntryNotFoundError:
        reason = offline_reason() if hub_offline() else "the Hub cannot be reached"
        raise SourceNotFoundError(
            f"not in the cache: {remote.url} ({remote.filename} of {where}; {reason}; "
            f"cache {cache_dir or constants.HF_HUB_CACHE})"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as error:
        raise SourceNotFoundError(
            f"not found: {remote.url} ({type(error).__name__}: no {remote.filename} in {where})"
        ) from None


def _fetch_url(remote: RemoteFile) -> tuple[Path, bool]:
    """(cached path, whether it was downloaded now)."""
    from urllib.error import HTTPError, URLError

    import torch.hub

    path = url_cache_path(remote.url)
    if path.is_file():
        return path, False
    if hub_offline():
        raise SourceNotFoundError(f"not in the cache: {remote.url} ({offline_reason()}; looked for {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(remote.url, str(path), progress=True)  # to a temporary file, then renamed
    except HTTPError as error:
        raise SourceNotFoundError(f"not found: {remote.url} (HTTP {error.code})") from None
    except URLError as error:
        raise InputError(f"cannot download {remote.url}: {error.reason}") from None
    return path, True


def fetch_file(source, revision: str | None = None, sha256: str | None = None, cache_dir=None):
    """A local path for `source`: Hub files and URLs are fetched into their cache (once); anything else is returned
    unchanged. With `sha256`, the file is checked against it (a file that fails the check just after its download
    is removed again, a cached one is left for the user to inspect).

    Args:
        revision: Hub revision (branch, tag or commit) of a Hub file; must agree with one written in the URL.
        cache_dir: Hub cache folder (default `HF_HUB_CACHE`).

    Raises:
        SourceNotFoundError: offline and not cached ("not in the cache: ..."), or no such file.
        InputError: a malformed name, a bad or mismatching digest, `revision` for a plain URL.
    """
    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise InputError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    remote = parse_remote_file(source) if is_remote_file(source) else None
    downloaded = False
    if remote is None:
        path = source
        if sha256 is not None and not Path(path).is_file():
            raise InputError(f"--sha256 checks a checkpoint file; {source} is not one")
    elif remote.on_hub:
        path = _fetch_hub_file(remote, revision, cache_dir)
    else:
        if revision:
            raise InputError(f"--revision applies to Hub files; {remote.url} is a plain URL")
        path, downloaded = _fetch_url(remote)
    if sha256 is not None:
        try:
            check_sha256(path, sha256, source)
        except InputError:
            if downloaded:
                os.remove(path)
            raise
    return path


__all__ = [
    "RemoteFile",
    "check_sha256",
    "fetch_file",
    "is_remote_file",
    "parse_remote_file",
    "sha256_of",
    "url_cache_path",
]
