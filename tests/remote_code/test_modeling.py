"""AlibiDinov2Model and AlibiDinov2Backbone: parity with transformers' DINOv2, equivariance, attention paths,
input checks, training features."""

import pytest
import torch
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from compile_counting import compiled_graph_count
from configuration_alibi_dinov2 import AlibiDinov2Config
from conftest import TINY_DINOV2, assert_same_outputs
from modeling_alibi_dinov2 import AlibiDinov2Backbone, AlibiDinov2Model


PATCH = 14


def alibi_model(tiny_kwargs, seed=0, **options):
    torch.manual_seed(seed)
    return AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs, **options)).eval()


def images(batch, height, width, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- parity with transformers' own classes --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(56, 56), (70, 42), (57, 85)])
def test_stock_mode_equals_dinov2_with_registers(tiny_kwargs, size):
    torch.manual_seed(0)
    reference = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tiny_kwargs, num_register_tokens=4)).eval()
    model = AlibiDinov2Model(
        AlibiDinov2Config(**tiny_kwargs, num_register_tokens=4, use_alibi=False, use_absolute_position_embeddings=True)
    ).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    pixel_values = images(2, *size)
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True)
        actual = model(pixel_values, output_hidden_states=True)
    assert_same_outputs(actual, expected, num_hidden_states=3)


@pytest.mark.parametrize("size", [(56, 56), (70, 42)])
def test_stock_mode_without_registers_equals_dinov2(tiny_kwargs, size):
    torch.manual_seed(0)
    reference = Dinov2Model(Dinov2Config(**tiny_kwargs)).eval()
    config = AlibiDinov2Config(
        **tiny_kwargs,
        num_register_tokens=0,
        use_alibi=False,
        use_absolute_position_embeddings=True,
        interpolate_antialias=False,
    )
    model = AlibiDinov2Model(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    pixel_values = images(2, *size)
    mask = torch.zeros(2, (size[0] // PATCH) * (size[1] // PATCH), dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values).last_hidden_state, reference(pixel_values).last_hidden_state, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            model(pixel_values, bool_masked_pos=mask).last_hidden_state,
            reference(pixel_values, bool_masked_pos=mask).last_hidden_state,
            atol=1e-5,
            rtol=0,
        )


def test_antialias_choice_matters_when_the_grid_changes(tiny_kwargs):
    torch.manual_seed(0)
    reference = Dinov2Model(Dinov2Config(**tiny_kwargs)).eval()
    config = AlibiDinov2Config(
        **tiny_kwargs, num_register_tokens=0, use_alibi=False, use_absolute_position_embeddings=True
    )  # antialias on: the with-registers behaviour, not Dinov2Model's
    model = AlibiDinov2Model(config).eval()
    model.load_state_dict(reference.state_dict())
    pixel_values = images(1, 42, 28)  # a 3 x 2 grid from the trained 4 x 4: downsampling, where antialias acts
    with torch.no_grad():
        difference = (model(pixel_values).last_hidden_state - reference(pixel_values).last_hidden_state).abs().max()
    assert difference > 1e-3


# --- the ALiBi model ----------------------------------------------------------------------------------------------


def test_alibi_model_has_no_position_embedding_and_takes_any_grid(tiny_kwargs):
    model = alibi_model(tiny_kwargs)
    assert model.embeddings.position_embeddings is None
    assert not any("position_embeddings" in name for name in model.state_dict())
    for height, width in [(14, 14), (14, 98), (71, 29), (200, 140)]:
        with torch.no_grad():
            output = model(images(1, height, width))
        grid = (height // PATCH) * (width // PATCH)
        assert output.last_hidden_state.shape == (1, 1 + 4 + grid, 32)
        assert torch.isfinite(output.last_hidden_state).all()


@pytest.mark.parametrize("slopes", ["constant", "geometric", "learned"])
@pytest.mark.parametrize("num_register_tokens", [0, 4])
def test_eager_and_sdpa_agree(tiny_kwargs, slopes, num_register_tokens):
    model = alibi_model(tiny_kwargs, alibi_slopes=slopes, num_register_tokens=num_register_tokens)
    pixel_values = images(2, 70, 56)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(pixel_values).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(pixel_values, output_attentions=True)
    torch.testing.assert_close(sdpa, eager.last_hidden_state, atol=1e-5, rtol=0)
    assert eager.attentions[0].shape == (2, 2, 1 + num_register_tokens + 20, 1 + num_register_tokens + 20)


def test_alibi_bias_reaches_the_attention(tiny_kwargs):
    with_alibi = alibi_model(tiny_kwargs, use_alibi=True)
    without = alibi_model(tiny_kwargs, use_alibi=False)
    without.load_state_dict(with_alibi.state_dict())
    pixel_values = images(1, 56, 56)
    with torch.no_grad():
        difference = (with_alibi(pixel_values).last_hidden_state - without(pixel_values).last_hidden_state).abs()
    assert difference.max() > 1e-3


@pytest.mark.parametrize("size, shift", [((56, 56), (1, 2)), ((42, 70), (2, 3)), ((28, 84), (1, 5))])
def test_wrapped_alibi_is_equivariant_to_rolls_by_whole_patches(tiny_kwargs, size, shift):
    model = alibi_model(tiny_kwargs)
    pixel_values = images(2, *size)
    grid = (size[0] // PATCH, size[1] // PATCH)
    rolled = torch.roll(pixel_values, shifts=(shift[0] * PATCH, shift[1] * PATCH), dims=(2, 3))
    with torch.no_grad():
        features = model.get_patch_features(pixel_values)
        rolled_features = model.get_patch_features(rolled)
        cls, rolled_cls = model(pixel_values).pooler_output, model(rolled).pooler_output
    assert features.shape == (2, 32, *grid)
    torch.testing.assert_close(rolled_features, torch.roll(features, shifts=shift, dims=(2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(rolled_cls, cls, atol=1e-4, rtol=0)


def test_unwrapped_alibi_is_not_roll_equivariant(tiny_kwargs):
    model = alibi_model(tiny_kwargs, alibi_wrap=False)
    pixel_values = images(1, 56, 70)
    rolled = torch.roll(pixel_values, shifts=(PATCH, 2 * PATCH), dims=(2, 3))
    with torch.no_grad():
        expected = torch.roll(model.get_patch_features(pixel_values), shifts=(1, 2), dims=(2, 3))
        error = (model.get_patch_features(rolled) - expected).abs().max()
    # Ten times the tolerance the wrapped model meets: the broken symmetry is well above float noise.
    assert error > 1e-3


def test_patch_features_are_the_reshaped_patch_tokens(tiny_kwargs):
    model = alibi_model(tiny_kwargs)
    pixel_values = images(2, 42, 70)
    with torch.no_grad():
        tokens = model(pixel_values).last_hidden_state
        features = model.get_patch_features(pixel_values)
    assert features.shape == (2, 32, 3, 5)
    # Token 5 + 1 * 5 + 2 is the patch in row 1, column 2.
    torch.testing.assert_close(features[:, :, 1, 2], tokens[:, 5 + 1 * 5 + 2])


def test_outputs_follow_dinov2_with_registers(tiny_kwargs):
    model = alibi_model(tiny_kwargs)
    with torch.no_grad():
        output = model(images(2, 56, 42), output_hidden_states=True)
    assert output.last_hidden_state.shape == (2, 1 + 4 + 12, 32)
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[:, 0])
    assert len(output.hidden_states) == 3
    # The last hidden state is before the final LayerNorm, as in transformers' DINOv2.
    torch.testing.assert_close(model.layernorm(output.hidden_states[-1]), output.last_hidden_state)
    as_tuple = model(images(2, 56, 42), return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == output.last_hidden_state.shape


def test_gradient_checkpointing_gives_the_same_gradients(tiny_kwargs):
    pixel_values = images(2, 56, 56)
    gradients = []
    for checkpointing in (False, True):
        model = alibi_model(tiny_kwargs, alibi_slopes="learned").train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.encoder.layer)
        model(pixel_values).last_hidden_state.square().mean().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and "encoder.alibi.slopes" in gradients[0]
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(tiny_kwargs, dtype):
    model = alibi_model(tiny_kwargs)
    pixel_values = images(1, 56, 70)
    with torch.no_grad():
        reference = model(pixel_values).last_hidden_state
        model = model.to(dtype)
        half = model(pixel_values.to(dtype)).last_hidden_state
    assert half.dtype == dtype
    cosine = torch.nn.functional.cosine_similarity(half.float(), reference, dim=-1)
    assert cosine.min() > 0.99


# --- errors ----------------------------------------------------------------------------------------------------


def test_wrong_channel_count_is_a_clear_error(tiny_kwargs):
    model = alibi_model(tiny_kwargs)
    with pytest.raises(ValueError, match="1 channels but the model expects 3.*Repeat a grayscale"):
        model(torch.randn(1, 1, 56, 56))


def test_image_smaller_than_a_patch_is_a_clear_error(tiny_kwargs):
    model = alibi_model(tiny_kwargs)
    with pytest.raises(ValueError, match=r"13 x 56 px\) is smaller than one 14 x 14 patch"):
        model(torch.randn(1, 3, 13, 56))


def test_three_dimensional_input_is_a_clear_error(tiny_kwargs):
    model = alibi_model(tiny_kwargs)
    with pytest.raises(ValueError, match=r"3-D tensor.*unsqueeze\(0\)"):
        model(torch.randn(3, 56, 56))


def test_missing_input_is_a_clear_error(tiny_kwargs):
    with pytest.raises(ValueError, match="`pixel_values` is required"):
        alibi_model(tiny_kwargs)()


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_attention_without_bias_support_is_refused(tiny_kwargs, implementation):
    model = alibi_model(tiny_kwargs)
    with pytest.raises(ValueError, match=f'"{implementation}" cannot add the 2D ALiBi bias') as refusal:
        model.set_attn_implementation(implementation)
    # The message names the ways out: the dense paths and the two streamed ones.
    for way_out in ('"sdpa"', '"eager"', '"alibi_chunked"', '"alibi_flex"', "use_alibi=False"):
        assert way_out in str(refusal.value), (way_out, str(refusal.value))
    model.config._attn_implementation = implementation  # set behind the checks' back
    with pytest.raises(ValueError, match='cannot add the 2D ALiBi bias.*"alibi_chunked".*"alibi_flex"'):
        model(images(1, 28, 28))


# --- torch.compile and torch.export ------------------------------------------------------------------------------

# Twelve inputs: new heights, widths and batch sizes, grids of 2 to 11 patches per side.
COMPILE_SIZES = [(1, 28, 28), (1, 42, 28), (2, 56, 28), (1, 56, 70), (2, 70, 42), (1, 98, 56), (2, 84, 112),
                 (1, 112, 84), (2, 42, 126), (1, 140, 98), (2, 126, 140), (1, 28, 154)]


@pytest.fixture(scope="module")
def stock_graph_count():
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(**TINY_DINOV2, num_register_tokens=4)
    return compiled_graph_count(Dinov2WithRegistersModel(config).eval(), COMPILE_SIZES)


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("slopes", ["constant", "learned"])
def test_compiled_model_needs_no_more_graphs_than_stock_dinov2(tiny_kwargs, stock_graph_count, slopes):
    """The bias cache is Python state: traced, it made dynamo guard on it and compile once per image size until its
    recompile limit (8). Computed in the graph, it lets one dynamic-shape graph serve new sizes as stock DINOv2's."""
    model = alibi_model(tiny_kwargs, alibi_slopes=slopes)
    eager_cache = model.encoder.alibi._cache
    assert compiled_graph_count(model, COMPILE_SIZES) <= stock_graph_count < torch._dynamo.config.recompile_limit
    # Only the eager calls (the references) filled the cache; the compiled ones computed the bias in the graph.
    assert len(eager_cache) == min(len(COMPILE_SIZES), 8)


EXPORT_CASES = [dict(), dict(alibi_slopes="learned"), dict(alibi_metric="manhattan", alibi_wrap=False)]


@pytest.mark.compile
@pytest.mark.parametrize("options", EXPORT_CASES, ids=["constant", "learned", "manhattan-unwrapped"])
def test_one_exported_program_serves_every_image_size(tiny_kwargs, options):
    """Height and width stay symbolic (multiples of the patch size, grids of 2 or more patches per side)."""
    model = alibi_model(tiny_kwargs, **options)
    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    program = torch.export.export(model, (images(2, 56, 70),), dynamic_shapes=({2: PATCH * height, 3: PATCH * width},))
    exported = program.module()
    for size in [(28, 42), (70, 56), (98, 28)]:
        pixel_values = images(2, *size, seed=size[0])
        with torch.no_grad():
            expected = model(pixel_values).last_hidden_state
        torch.testing.assert_close(exported(pixel_values).last_hidden_state, expected, atol=1e-5, rtol=0)


# --- backbone and Auto classes ------------------------------------------------------------------------------------


def test_backbone_feature_maps_match_the_model(tiny_kwargs):
    torch.manual_seed(0)
    config = AlibiDinov2Config(**tiny_kwargs, out_indices=[1, 2])
    backbone = AlibiDinov2Backbone(config).eval()
    model = AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs)).eval()
    model.load_state_dict(backbone.state_dict())
    pixel_values = images(2, 42, 84)
    with torch.no_grad():
        output = backbone(pixel_values)
        features = model.get_patch_features(pixel_values)
    assert [tuple(f.shape) for f in output.feature_maps] == [(2, 32, 3, 6), (2, 32, 3, 6)]
    torch.testing.assert_close(output.feature_maps[-1], features)
    assert output.hidden_states is None


def test_importing_the_project_registers_the_auto_classes(tiny_kwargs):
    config = AutoConfig.for_model("alibi_dinov2", **tiny_kwargs)
    assert isinstance(config, AlibiDinov2Config)
    assert type(AutoModel.from_config(config)) is AlibiDinov2Model
    assert type(AutoBackbone.from_config(config)) is AlibiDinov2Backbone
