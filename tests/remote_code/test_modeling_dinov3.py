"""AlibiDinov3Model and AlibiDinov3Backbone: parity with transformers' DINOv3 ViT, equivariance, the bias shared with
ALiBi-DINOv2, compile and export, Auto classes."""

import warnings

import pytest
import torch
from transformers import AutoBackbone, AutoConfig, AutoModel, DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel

import alibi_attention
import modeling_alibi_dinov2
import modeling_alibi_dinov3
from alibi_attention import AlibiPositionBias
from compile_counting import compiled_graph_count
from configuration_alibi_dinov2 import AlibiDinov2Config
from configuration_alibi_dinov3 import AlibiDinov3Config
from conftest import TINY_DINOV3, assert_same_outputs, tiny_alibi_model
from modeling_alibi_dinov2 import AlibiDinov2Model
from modeling_alibi_dinov3 import AlibiDinov3Backbone, AlibiDinov3Model


PATCH = 16


def images(batch, height, width, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def stock_pair(model_class=DINOv3ViTModel, alibi_class=AlibiDinov3Model, **options):
    """transformers' DINOv3 ViT with random weights, and the ALiBi-DINOv3 class in stock mode holding them (plain MLP
    unless `options` say otherwise: the default of `DINOv3ViTConfig`, not of `AlibiDinov3Config`)."""
    options = {"use_gated_mlp": False, "hidden_act": "gelu", **options}
    torch.manual_seed(0)
    reference = model_class(DINOv3ViTConfig(**TINY_DINOV3, **options)).eval()
    config = AlibiDinov3Config(**TINY_DINOV3, **options, use_alibi=False, use_rope=True)
    model = alibi_class(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


# --- parity with transformers' DINOv3 ViT ---------------------------------------------------------------------------

MLPS = [dict(use_gated_mlp=False, hidden_act="gelu"), dict(use_gated_mlp=True, hidden_act="silu")]


@pytest.mark.parametrize("mlp", MLPS, ids=["mlp", "swiglu"])
@pytest.mark.parametrize("num_register_tokens", [0, 4])
@pytest.mark.parametrize("size", [(64, 64), (48, 96), (57, 85)])
def test_stock_mode_equals_dinov3_vit(size, num_register_tokens, mlp):
    reference, model = stock_pair(num_register_tokens=num_register_tokens, **mlp)
    pixel_values = images(2, *size)
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True)
        actual = model(pixel_values, output_hidden_states=True)
    assert_same_outputs(actual, expected, num_hidden_states=3)


def test_stock_mode_equals_dinov3_vit_with_masked_patches_and_eager_attention():
    reference, model = stock_pair(num_register_tokens=4)
    for module in (reference, model):
        module.set_attn_implementation("eager")
    pixel_values = images(2, 48, 80)
    mask = torch.zeros(2, 3 * 5, dtype=torch.bool)
    mask[:, ::4] = True
    with torch.no_grad():
        expected = reference(pixel_values, bool_masked_pos=mask, output_attentions=True)
        actual = model(pixel_values, bool_masked_pos=mask, output_attentions=True)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    for ours, theirs in zip(actual.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [dict(out_indices=[1, 2]), dict(out_indices=[0, 2], apply_layernorm=False), dict(reshape_hidden_states=False)],
    ids=["normed", "unnormed", "tokens"],
)
def test_stock_mode_backbone_equals_dinov3_vit_backbone(options):
    reference, backbone = stock_pair(DINOv3ViTBackbone, AlibiDinov3Backbone, num_register_tokens=4, **options)
    pixel_values = images(2, 48, 80)
    with torch.no_grad():
        expected = reference(pixel_values)
        actual = backbone(pixel_values)
    assert len(actual.feature_maps) == len(expected.feature_maps) == len(backbone.out_features)
    for ours, theirs in zip(actual.feature_maps, expected.feature_maps):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert actual.hidden_states is None and expected.hidden_states is None


def test_state_dict_keys_are_those_of_dinov3_vit():
    reference = DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3, num_register_tokens=4, use_gated_mlp=True))
    stock_keys = set(reference.state_dict())
    assert {"embeddings.register_tokens", "model.layer.1.mlp.gate_proj.weight", "norm.weight"} < stock_keys
    for options in (dict(), dict(use_rope=True), dict(use_alibi=False)):
        assert set(AlibiDinov3Model(AlibiDinov3Config(**TINY_DINOV3, **options)).state_dict()) == stock_keys
    learned = AlibiDinov3Model(AlibiDinov3Config(**TINY_DINOV3, alibi_slopes="learned")).state_dict()
    assert set(learned) == stock_keys | {"model.alibi.slopes"} and learned["model.alibi.slopes"].shape == (2, 2)


def test_default_config_is_vit_small_plus_with_four_registers():
    config = AlibiDinov3Config()
    architecture = {name: getattr(config, name) for name in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp", "hidden_act",
        "patch_size", "num_register_tokens", "key_bias", "layer_norm_eps", "layerscale_value", "rope_theta",
    )}
    assert architecture == dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, use_gated_mlp=True,
        hidden_act="silu", patch_size=16, num_register_tokens=4, key_bias=False, layer_norm_eps=1e-5,
        layerscale_value=1.0, rope_theta=100.0,
    )
    alibi_options = ("alibi_metric", "alibi_wrap", "alibi_normalize", "alibi_slopes", "alibi_jitter", "use_alibi")
    assert {name: getattr(config, name) for name in alibi_options} == {
        name: getattr(AlibiDinov2Config(), name) for name in alibi_options
    }
    assert config.use_rope is False
    with pytest.raises(ValueError, match="`alibi_metric` must be one of"):
        AlibiDinov3Config(alibi_metric="chebyshev")


# --- the ALiBi model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, shift", [((64, 64), (1, 2)), ((48, 80), (2, 3)), ((32, 96), (1, 5))])
def test_wrapped_alibi_is_equivariant_to_rolls_by_whole_patches(size, shift):
    model = tiny_alibi_model("alibi_dinov3")
    pixel_values = images(2, *size)
    rolled = torch.roll(pixel_values, shifts=(shift[0] * PATCH, shift[1] * PATCH), dims=(2, 3))
    with torch.no_grad():
        features, rolled_features = model.get_patch_features(pixel_values), model.get_patch_features(rolled)
        cls, rolled_cls = model(pixel_values).pooler_output, model(rolled).pooler_output
    assert features.shape == (2, 32, size[0] // PATCH, size[1] // PATCH)
    torch.testing.assert_close(rolled_features, torch.roll(features, shifts=shift, dims=(2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(rolled_cls, cls, atol=1e-4, rtol=0)


def test_unwrapped_alibi_is_not_roll_equivariant():
    model = tiny_alibi_model("alibi_dinov3", alibi_wrap=False)
    pixel_values = images(1, 64, 80)
    rolled = torch.roll(pixel_values, shifts=(PATCH, 2 * PATCH), dims=(2, 3))
    with torch.no_grad():
        expected = torch.roll(model.get_patch_features(pixel_values), shifts=(1, 2), dims=(2, 3))
        error = (model.get_patch_features(rolled) - expected).abs().max()
    assert error > 1e-3  # ten times the tolerance the wrapped model meets


def test_alibi_and_rope_together_add_the_bias_to_stock_dinov3():
    """Both on: RoPE as in DINOv3 plus the bias. With every slope 0 that is stock DINOv3; with slopes, it differs."""
    reference, _ = stock_pair(num_register_tokens=4, use_gated_mlp=True, hidden_act="silu")
    model = AlibiDinov3Model(AlibiDinov3Config(**TINY_DINOV3, use_rope=True, alibi_slopes="learned")).eval()
    model.load_state_dict({**reference.state_dict(), "model.alibi.slopes": torch.zeros(2, 2)}, strict=True)
    pixel_values = images(2, 48, 64)
    with torch.no_grad():
        expected = reference(pixel_values).last_hidden_state
        torch.testing.assert_close(model(pixel_values).last_hidden_state, expected, atol=1e-5, rtol=0)
        model.model.alibi.slopes.fill_(1.0)
        assert (model(pixel_values).last_hidden_state - expected).abs().max() > 1e-3


def test_the_bias_of_both_model_types_is_one_implementation():
    """One class, imported once, builds the bias of ALiBi-DINOv2 and ALiBi-DINOv3: the same tensors for the same grid
    and options, whatever the patch size."""
    assert modeling_alibi_dinov2.AlibiPositionBias is modeling_alibi_dinov3.AlibiPositionBias is AlibiPositionBias
    options = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4,
                   alibi_slopes="geometric", alibi_metric="manhattan")
    dinov2 = AlibiDinov2Model(AlibiDinov2Config(**options, patch_size=14)).encoder.alibi
    dinov3 = AlibiDinov3Model(AlibiDinov3Config(**options, patch_size=16)).model.alibi
    assert type(dinov2) is type(dinov3) is AlibiPositionBias
    for grid in [(3, 5), (4, 4)]:
        bias = dinov3(grid, 1, dtype=torch.float32, device=torch.device("cpu"))
        assert bias.shape == (1, 2, 5 + grid[0] * grid[1], 5 + grid[0] * grid[1]) and bias.abs().max() > 0
        assert torch.equal(bias, dinov2(grid, 1, dtype=torch.float32, device=torch.device("cpu")))


def test_patch_features_are_the_final_normed_patch_tokens():
    model = tiny_alibi_model("alibi_dinov3")
    pixel_values = images(2, 48, 80)
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True)
        features = model.get_patch_features(pixel_values)
    assert output.last_hidden_state.shape == (2, 1 + 4 + 15, 32) and features.shape == (2, 32, 3, 5)
    torch.testing.assert_close(features[:, :, 1, 2], output.last_hidden_state[:, 5 + 1 * 5 + 2])  # row 1, column 2
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[:, 0])
    torch.testing.assert_close(model.norm(output.hidden_states[-1]), output.last_hidden_state)


@pytest.mark.parametrize("slopes", ["constant", "learned"])
def test_eager_and_sdpa_agree(slopes):
    model = tiny_alibi_model("alibi_dinov3", alibi_slopes=slopes)
    pixel_values = images(2, 48, 64)
    with torch.no_grad():
        sdpa = model(pixel_values).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(pixel_values, output_attentions=True)
    torch.testing.assert_close(sdpa, eager.last_hidden_state, atol=1e-5, rtol=0)
    assert eager.attentions[0].shape == (2, 2, 17, 17)


def test_gradient_checkpointing_gives_the_same_gradients():
    pixel_values = images(2, 48, 48)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_alibi_model("alibi_dinov3", alibi_slopes="learned").train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layer)
        model(pixel_values).last_hidden_state.square().mean().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and "model.alibi.slopes" in gradients[0]
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5)


def test_input_errors_name_the_problem():
    model = tiny_alibi_model("alibi_dinov3")
    with pytest.raises(ValueError, match=r"15 x 64 px\) is smaller than one 16 x 16 patch"):
        model(torch.randn(1, 3, 15, 64))
    with pytest.raises(ValueError, match="1 channels but the model expects 3.*Repeat a grayscale"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match='"flash_attention_2" cannot add the 2D ALiBi bias'):
        model.set_attn_implementation("flash_attention_2")


# --- torch.compile and torch.export ---------------------------------------------------------------------------------

# New heights, widths and batch sizes, grids of 2 to 7 patches per side.
COMPILE_SIZES = [(1, 32, 32), (1, 48, 32), (2, 64, 32), (1, 64, 80), (2, 80, 48), (1, 112, 64)]


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_model_needs_no_more_graphs_than_stock_dinov3():
    torch.manual_seed(0)
    stock = DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3, num_register_tokens=4)).eval()
    stock_count = compiled_graph_count(stock, COMPILE_SIZES)
    model = tiny_alibi_model("alibi_dinov3")
    assert compiled_graph_count(model, COMPILE_SIZES) <= stock_count < torch._dynamo.config.recompile_limit
    assert len(model.model.alibi._cache) == len(COMPILE_SIZES)  # only the eager references filled the cache


@pytest.mark.compile
def test_one_exported_program_serves_every_image_size():
    model = tiny_alibi_model("alibi_dinov3", alibi_slopes="learned")
    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    program = torch.export.export(model, (images(2, 48, 80),), dynamic_shapes=({2: PATCH * height, 3: PATCH * width},))
    for size in [(32, 48), (80, 64), (112, 32)]:
        pixel_values = images(2, *size, seed=size[0])
        with torch.no_grad():
            expected = model(pixel_values).last_hidden_state
        torch.testing.assert_close(program.module()(pixel_values).last_hidden_state, expected, atol=1e-5, rtol=0)


# --- Auto classes ---------------------------------------------------------------------------------------------------


def test_importing_the_project_registers_the_auto_classes():
    config = AutoConfig.for_model("alibi_dinov3", **TINY_DINOV3)
    assert isinstance(config, AlibiDinov3Config)
    assert type(AutoModel.from_config(config)) is AlibiDinov3Model
    assert type(AutoBackbone.from_config(config)) is AlibiDinov3Backbone
    assert config.auto_map == {
        "AutoConfig": "configuration_alibi_dinov3.AlibiDinov3Config",
        "AutoModel": "modeling_alibi_dinov3.AlibiDinov3Model",
        "AutoBackbone": "modeling_alibi_dinov3.AlibiDinov3Backbone",
    }
    assert alibi_attention.AlibiPositionBias is AlibiPositionBias


@pytest.mark.parametrize("implementation", ["alibi_chunked", "alibi_flex"])
def test_streamed_paths_with_rope_on_match_dense_sdpa(implementation):
    model = tiny_alibi_model("alibi_dinov3", model_options=dict(alibi_query_chunk_size=7), use_rope=True)
    pixel_values = images(2, 48, 80)
    with torch.no_grad():
        dense = model(pixel_values).last_hidden_state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CPU FlexAttention warns that it runs uncompiled
            streamed = model(pixel_values, attn_implementation=implementation).last_hidden_state
    torch.testing.assert_close(streamed, dense, atol=1e-4, rtol=0)
