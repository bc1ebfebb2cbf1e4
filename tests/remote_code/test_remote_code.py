"""A saved ALiBi-DINOv2 or ALiBi-DINOv3 folder is self-contained remote code: it loads with the Auto classes in a
process where this project cannot be imported."""

import json
import os

import pytest
import torch

from configuration_alibi_dinov2 import ALIBI_RUNTIME_DEFAULTS
from conftest import ALIBI_MODEL_TYPES, tiny_alibi_model
from modeling_alibi_dinov2 import AlibiDinov2Model


CLASS_PREFIX = {"alibi_dinov2": "AlibiDinov2", "alibi_dinov3": "AlibiDinov3"}


def save_tiny_model(model_type, tmp_path):
    """Save a tiny model with learned slopes, and its input and output on a 3 x 5 patch grid beside it (io.pt)."""
    model = tiny_alibi_model(model_type, alibi_slopes="learned")
    folder = tmp_path / "alibi-tiny"
    model.save_pretrained(folder)
    patch = model.config.patch_size
    pixel_values = torch.randn(2, 3, 3 * patch, 5 * patch)
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
    torch.save({"pixel_values": pixel_values, "expected": expected}, tmp_path / "io.pt")
    return folder


@pytest.fixture
def saved_model(tmp_path):
    return save_tiny_model("alibi_dinov2", tmp_path)


@pytest.fixture(params=ALIBI_MODEL_TYPES)
def saved_any_model(request, tmp_path):
    return save_tiny_model(request.param, tmp_path)


def test_save_pretrained_writes_auto_map_and_both_model_files(saved_any_model):
    config = json.loads((saved_any_model / "config.json").read_text())
    model_type = config["model_type"]
    files = sorted(os.listdir(saved_any_model))
    assert files == [
        "alibi_attention.py",
        "config.json",
        f"configuration_{model_type}.py",
        "model.safetensors",
        f"modeling_{model_type}.py",
    ]
    assert model_type in ALIBI_MODEL_TYPES
    prefix = CLASS_PREFIX[model_type]
    assert config["architectures"] == [f"{prefix}Model"]
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_{model_type}.{prefix}Config",
        "AutoModel": f"modeling_{model_type}.{prefix}Model",
        "AutoBackbone": f"modeling_{model_type}.{prefix}Backbone",
    }
    # The attention's memory options belong to the machine that runs the model, not to its weights.
    assert not set(ALIBI_RUNTIME_DEFAULTS) & set(config), config


def test_runtime_options_are_load_time_options(saved_model, tmp_path):
    model = AlibiDinov2Model.from_pretrained(saved_model, alibi_dense_max_tokens=0, alibi_chunk_memory_mb=64).eval()
    assert (model.alibi_dense_max_tokens, model.alibi_query_chunk_size, model.alibi_chunk_memory_mb) == (0, 1024, 64)
    assert not any(hasattr(model.config, name) for name in ALIBI_RUNTIME_DEFAULTS)
    data = torch.load(tmp_path / "io.pt")
    with torch.no_grad():
        streamed = model(data["pixel_values"]).last_hidden_state
    assert not model.encoder.alibi._cache  # no dense bias (nor its distances) was built: every input streams
    torch.testing.assert_close(streamed, data["expected"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="`alibi_query_chunk_size` must be positive"):
        AlibiDinov2Model.from_pretrained(saved_model, alibi_query_chunk_size=0)


def test_an_old_config_json_with_runtime_options_loads_without_them(saved_model, tmp_path, caplog):
    """Folders saved before the options left the configuration carry them in config.json: they load, the options
    there are ignored (with a warning where one differs from its default) and are not saved again."""
    config_path = saved_model / "config.json"
    config = json.loads(config_path.read_text())
    config.update(alibi_dense_max_tokens=8192, alibi_query_chunk_size=7,
                  alibi_chunk_memory_mb=ALIBI_RUNTIME_DEFAULTS["alibi_chunk_memory_mb"])
    config_path.write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        model = AlibiDinov2Model.from_pretrained(saved_model).eval()
    warnings = [record.getMessage() for record in caplog.records if "is ignored" in record.getMessage()]
    assert len(warnings) == 1 and "`alibi_query_chunk_size=7` is ignored" in warnings[0], warnings
    assert {name: getattr(model, name) for name in ALIBI_RUNTIME_DEFAULTS} == ALIBI_RUNTIME_DEFAULTS
    data = torch.load(tmp_path / "io.pt")
    with torch.no_grad():
        assert torch.equal(model(data["pixel_values"]).last_hidden_state, data["expected"])
    model.save_pretrained(tmp_path / "saved-again")
    saved_again = json.loads((tmp_path / "saved-again" / "config.json").read_text())
    assert not set(ALIBI_RUNTIME_DEFAULTS) & set(saved_again), saved_again


@pytest.mark.slow
@pytest.mark.multiprocess
def test_remote_code_round_trip_gives_identical_outputs(saved_any_model, tmp_path, run_isolated):
    model_type = json.loads((saved_any_model / "config.json").read_text())["model_type"]
    result = run_isolated(
        f"""
        import torch
        from transformers import AutoModel
        for name in ("alibi_attention", "modeling_{model_type}", "configuration_{model_type}"):
            try:
                __import__(name)
                raise SystemExit("the project must not be importable here")
            except ImportError:
                pass
        model = AutoModel.from_pretrained({str(saved_any_model)!r}, trust_remote_code=True, alibi_chunk_memory_mb=64)
        model.eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(model).__name__ == "{CLASS_PREFIX[model_type]}Model"
        assert model.alibi_chunk_memory_mb == 64 and not hasattr(model.config, "alibi_chunk_memory_mb")
        data = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            actual = model(data["pixel_values"]).last_hidden_state
        assert torch.equal(actual, data["expected"]), (actual - data["expected"]).abs().max()
        print("identical")
        """
    )
    assert "identical" in result.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_remote_code_backbone_feature_map_shapes(saved_any_model, run_isolated):
    # transformers 5.x's AutoBackbone.from_pretrained asks the Hub about any name before looking on disk, so a local
    # folder goes through AutoBackbone.from_config, which resolves the remote class, and that class's from_pretrained.
    result = run_isolated(
        f"""
        import torch
        from transformers import AutoBackbone, AutoConfig
        folder = {str(saved_any_model)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True, out_indices=[1, 2])
        backbone_class = type(AutoBackbone.from_config(config, trust_remote_code=True))
        assert backbone_class.__module__.startswith("transformers_modules."), backbone_class.__module__
        backbone = backbone_class.from_pretrained(folder, out_indices=[1, 2]).eval()
        patch = config.patch_size
        with torch.no_grad():
            maps = backbone(torch.randn(2, 3, 3 * patch, 5 * patch)).feature_maps
        print([tuple(m.shape) for m in maps])
        """
    )
    assert "[(2, 32, 3, 5), (2, 32, 3, 5)]" in result.stdout
