"""A saved ALiBi-DINOv2 folder is self-contained remote code: it loads with the Auto classes in a process where
this project cannot be imported."""

import json
import os

import pytest
import torch

from configuration_alibi_dinov2 import AlibiDinov2Config
from modeling_alibi_dinov2 import AlibiDinov2Model


@pytest.fixture
def saved_model(tmp_path, tiny_kwargs):
    torch.manual_seed(0)
    model = AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs, alibi_slopes="learned")).eval()
    folder = tmp_path / "alibi-tiny"
    model.save_pretrained(folder)
    pixel_values = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
    torch.save({"pixel_values": pixel_values, "expected": expected}, tmp_path / "io.pt")
    return folder


def test_save_pretrained_writes_auto_map_and_both_model_files(saved_model):
    files = sorted(os.listdir(saved_model))
    assert files == ["config.json", "configuration_alibi_dinov2.py", "model.safetensors", "modeling_alibi_dinov2.py"]
    config = json.loads((saved_model / "config.json").read_text())
    assert config["model_type"] == "alibi_dinov2"
    assert config["architectures"] == ["AlibiDinov2Model"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_alibi_dinov2.AlibiDinov2Config",
        "AutoModel": "modeling_alibi_dinov2.AlibiDinov2Model",
        "AutoBackbone": "modeling_alibi_dinov2.AlibiDinov2Backbone",
    }


def test_remote_code_round_trip_gives_identical_outputs(saved_model, tmp_path, run_isolated):
    result = run_isolated(
        f"""
        import torch
        from transformers import AutoModel
        try:
            import modeling_alibi_dinov2
            raise SystemExit("the project must not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(saved_model)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(model).__name__ == "AlibiDinov2Model"
        data = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            actual = model(data["pixel_values"]).last_hidden_state
        assert torch.equal(actual, data["expected"]), (actual - data["expected"]).abs().max()
        print("identical")
        """
    )
    assert "identical" in result.stdout


def test_remote_code_backbone_feature_map_shapes(saved_model, run_isolated):
    # transformers 5.x's AutoBackbone.from_pretrained asks the Hub about any name before looking on disk, so a local
    # folder goes through AutoBackbone.from_config, which resolves the remote class, and that class's from_pretrained.
    result = run_isolated(
        f"""
        import torch
        from transformers import AutoBackbone, AutoConfig
        folder = {str(saved_model)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True, out_indices=[1, 2])
        backbone_class = type(AutoBackbone.from_config(config, trust_remote_code=True))
        assert backbone_class.__module__.startswith("transformers_modules."), backbone_class.__module__
        backbone = backbone_class.from_pretrained(folder, out_indices=[1, 2]).eval()
        with torch.no_grad():
            maps = backbone(torch.randn(2, 3, 42, 70)).feature_maps
        print([tuple(m.shape) for m in maps])
        """
    )
    assert "[(2, 32, 3, 5), (2, 32, 3, 5)]" in result.stdout
