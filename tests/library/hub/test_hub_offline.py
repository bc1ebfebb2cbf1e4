"""Without HF_HUB_OFFLINE and without a network: one quick look for the Hub, then offline at once (cached ids
load, an uncached one is named in one line), instead of huggingface_hub's half a minute of retries."""

import logging
import socket

import huggingface_hub
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from alibi_dinov2.errors import SourceNotFoundError
from alibi_dinov2.hub import offline
from alibi_dinov2.hub.models import load_model
from alibi_dinov2.hub.sources import check_model_source
from hub_cache import put_in_hub_cache


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once the socket closes: nothing listens there


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A Hub endpoint nothing answers at, HF_HUB_OFFLINE unset, an empty Hub cache, and a count of the looks."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(offline, "_reachable", {})
    monkeypatch.setattr(offline, "_unreached", [])
    looks = []
    answers = offline._answers
    monkeypatch.setattr(offline, "_answers", lambda *args: looks.append(args) or answers(*args))
    return {"endpoint": endpoint, "cache": cache, "looks": looks}


def test_an_uncached_hub_id_is_named_after_one_look(unreachable_hub, caplog):
    endpoint = unreachable_hub["endpoint"]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            with pytest.raises(SourceNotFoundError) as error:
                check_model_source("someone/not-cached")
    assert str(error.value) == (
        "not found: someone/not-cached (no such file or folder, and the Hub id is not in the local cache while the "
        f"Hub cannot be reached at {endpoint})"
    )
    assert len(unreachable_hub["looks"]) == 1  # one look per process, not one per model
    said = [record.getMessage() for record in caplog.records if "cannot be reached" in record.getMessage()]
    assert said == [f"The Hub cannot be reached at {endpoint}: working offline, from the local Hub cache (as with "
                    "HF_HUB_OFFLINE=1)"]
    assert "Retrying" not in caplog.text and huggingface_hub.constants.HF_HUB_OFFLINE


def test_a_cached_hub_id_loads_without_retries(unreachable_hub, tmp_path, caplog):
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, patch_size=14, image_size=28))
    model.save_pretrained(tmp_path / "saved")
    put_in_hub_cache(unreachable_hub["cache"], "someone/tiny",
                     {name: tmp_path / "saved" / name for name in ("config.json", "model.safetensors")})
    with caplog.at_level(logging.WARNING):
        loaded, _ = load_model("someone/tiny")
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
    assert len(unreachable_hub["looks"]) == 1 and "Retrying" not in caplog.text
