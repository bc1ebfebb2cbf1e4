"""Whether the Hub may be reached now, and what the local Hub cache holds.

Without `HF_HUB_OFFLINE` and without a network, huggingface_hub retries every request for about half a minute before
it gives up. :func:`work_offline_if_unreachable` instead tries one TCP connection to the Hub endpoint (a few
seconds at most, once per process); when none answers it says so once and turns the process offline, so that
cached models load at once and an uncached one is named in one line.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from urllib.parse import urlsplit


logger = logging.getLogger(__name__)

REACH_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable: dict[str, bool] = {}  # endpoint -> whether it answered, once per process
_unreached: list[str] = []  # the endpoint this process found unreachable (and went offline for)


def in_offline_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo_id, filename), str)
        for filename in ("config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json")
    )


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set now (read at each call, unlike huggingface_hub's
    constant)."""
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_endpoint() -> str:
    """The Hub's address: `HF_ENDPOINT`, or huggingface_hub's (https://huggingface.co)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _answers(endpoint: str, timeout: float) -> bool:
    """Whether a TCP connection to `endpoint`'s host opens within `timeout` seconds (name lookup included)."""
    address = urlsplit(endpoint)
    port = address.port or (443 if address.scheme == "https" else 80)
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((address.hostname, port), timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # a name lookup ignores the socket's timeout
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether the Hub endpoint answers (asked once per process and endpoint; assumed behind a proxy)."""
    endpoint = hub_endpoint()
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    if endpoint not in _reachable:
        _reachable[endpoint] = _answers(endpoint, timeout)
    return _reachable[endpoint]


def work_offline_if_unreachable() -> bool:
    """Whether this process works offline: `HF_HUB_OFFLINE` is set, or the Hub cannot be reached, in which case
    this says so once and sets `HF_HUB_OFFLINE` for the rest of the process (and its children)."""
    if hub_offline():
        return True
    if hub_reachable():
        return False
    from huggingface_hub import constants

    endpoint = hub_endpoint()
    logger.warning("The Hub cannot be reached at %s: working offline, from the local Hub cache (as with "
                   "HF_HUB_OFFLINE=1)", endpoint)  # fmt: skip
    _unreached.append(endpoint)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    return True


def offline_reason() -> str:
    """Why Hub files come from the cache only: 'HF_HUB_OFFLINE is set' or 'the Hub cannot be reached at URL'."""
    return f"the Hub cannot be reached at {_unreached[-1]}" if _unreached else "HF_HUB_OFFLINE is set"
