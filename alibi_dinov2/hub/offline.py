"""Whether the Hub may be reached now, and what the local Hub cache holds."""

from __future__ import annotations

import os


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
