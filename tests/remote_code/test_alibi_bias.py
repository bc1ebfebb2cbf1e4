"""The 2D ALiBi bias: worked values, prefix tokens, slopes, cache, options."""

import math

import pytest
import torch

from alibi_attention import AlibiPositionBias, alibi_distance_matrix, mirror_patch_tokens
from configuration_alibi_dinov2 import AlibiDinov2Config


def position_bias(grid, num_register_tokens=0, layer_index=0, dtype=torch.float32, **options):
    config = AlibiDinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=num_register_tokens, **options
    )
    module = AlibiPositionBias(config)
    if module.slopes is not None:
        torch.nn.init.uniform_(module.slopes, 0.0, 1.0)
    return module, module(grid, layer_index, dtype=dtype, device=torch.device("cpu"))


def test_4x4_wrapped_normalised_euclidean_neighbours():
    distance = alibi_distance_matrix(4, 4)
    assert distance.max().item() == pytest.approx(1.0)
    # Token 0 = (0, 0), token 1 = (0, 1): horizontal neighbours; the largest wrapped distance is sqrt(8).
    assert -distance[0, 1].item() == pytest.approx(-1 / math.sqrt(8), abs=1e-6)
    assert -distance[0, 1].item() == pytest.approx(-0.35355, abs=1e-5)
    # Token 0 and token 3 = (0, 3) are neighbours across the wrapped border.
    assert distance[0, 3].item() == pytest.approx(distance[0, 1].item())


@pytest.mark.parametrize(
    "metric, wrap, normalize, expected",
    [
        ("manhattan", False, False, 5.0),
        ("manhattan", True, False, 2.0),
        ("euclidean", False, False, math.sqrt(17)),
        # Largest wrapped Manhattan distance on 2 x 5 is 1 + 2 = 3 (e.g. to token 7 = (1, 2)), so 2 / 3.
        ("manhattan", True, True, 2.0 / 3.0),
    ],
)
def test_2x5_grid_worked_values(metric, wrap, normalize, expected):
    # Token 0 = (0, 0), token 9 = (1, 4).
    distance = alibi_distance_matrix(2, 5, metric=metric, wrap=wrap, normalize=normalize)
    assert distance.shape == (10, 10)
    assert distance[0, 9].item() == pytest.approx(expected, abs=1e-6)


def test_2x5_wrapped_normalised_manhattan_reaches_one_at_the_farthest_tokens():
    distance = alibi_distance_matrix(2, 5, metric="manhattan")
    assert distance[0, 7].item() == pytest.approx(1.0) and distance[0, 8].item() == pytest.approx(1.0)
    assert distance.max().item() == pytest.approx(1.0)


def test_distance_matches_a_direct_loop():
    height, width = 3, 5
    distance = alibi_distance_matrix(height, width, wrap=True, normalize=False)
    coordinates = [(y, x) for y in range(height) for x in range(width)]
    for i, (yi, xi) in enumerate(coordinates):
        for j, (yj, xj) in enumerate(coordinates):
            dy, dx = abs(yi - yj), abs(xi - xj)
            dy, dx = min(dy, height - dy), min(dx, width - dx)
            assert distance[i, j].item() == pytest.approx(math.hypot(dy, dx), abs=1e-6)


def test_wrapped_distance_is_circulant():
    height, width = 3, 4
    distance = alibi_distance_matrix(height, width).reshape(height, width, height, width)
    shifted = torch.roll(distance, shifts=(1, 2, 1, 2), dims=(0, 1, 2, 3))
    assert torch.equal(distance, shifted)
    unwrapped = alibi_distance_matrix(height, width, wrap=False).reshape(height, width, height, width)
    assert not torch.allclose(unwrapped, torch.roll(unwrapped, shifts=(1, 2, 1, 2), dims=(0, 1, 2, 3)))


@pytest.mark.parametrize("grid, num_tokens", [((4, 4), 19), ((5, 5), 28)])
def test_prefix_tokens_get_zero_bias(grid, num_tokens):
    _, bias = position_bias(grid, num_register_tokens=2)
    assert bias.shape == (1, 1, num_tokens, num_tokens)
    assert torch.count_nonzero(bias[..., :3, :]) == 0
    assert torch.count_nonzero(bias[..., :, :3]) == 0
    assert torch.equal(bias[0, 0, 3:, 3:], -alibi_distance_matrix(*grid))


def test_single_patch_grid_gives_zeros_not_nan():
    distance = alibi_distance_matrix(1, 1)
    assert torch.equal(distance, torch.zeros(1, 1))
    _, bias = position_bias((1, 1), num_register_tokens=4)
    assert bias.shape == (1, 1, 6, 6)
    assert torch.isfinite(bias).all() and torch.count_nonzero(bias) == 0


def test_constant_bias_is_cached_per_grid_and_dtype():
    module, first = position_bias((4, 5))
    device = torch.device("cpu")
    assert module((4, 5), 1, dtype=torch.float32, device=device) is first  # reused across layers and calls
    half = module((4, 5), 0, dtype=torch.bfloat16, device=device)
    assert half.dtype == torch.bfloat16 and half is not first
    assert torch.allclose(half.float(), first, atol=1e-2)
    other_grid = module((5, 4), 0, dtype=torch.float32, device=device)
    assert other_grid.shape == first.shape and not torch.equal(other_grid, first)
    assert len(module._cache) == 3
    assert module((4, 5), 0, dtype=torch.float32, device=device) is first


def test_cached_bias_made_in_inference_mode_serves_training():
    module, _ = position_bias((2, 2), alibi_slopes="learned")
    with torch.inference_mode():
        module((3, 3), 0, dtype=torch.float32, device=torch.device("cpu"))
    bias = module((3, 3), 1, dtype=torch.float32, device=torch.device("cpu"))
    bias.sum().backward()
    assert module.slopes.grad is not None
    assert torch.count_nonzero(module.slopes.grad[0]) == 0 and torch.count_nonzero(module.slopes.grad[1]) == 2


def test_geometric_slopes_scale_each_head():
    _, bias = position_bias((3, 3), alibi_slopes="geometric")
    assert bias.shape == (1, 2, 10, 10)
    distance = alibi_distance_matrix(3, 3)
    for head, slope in enumerate([2.0**-4, 2.0**-8]):
        assert torch.allclose(bias[0, head, 1:, 1:], -slope * distance)



def test_fixed_slopes_are_made_once_per_device_and_serve_training_after_inference():
    module, _ = position_bias((3, 3), alibi_slopes="geometric")
    cpu = torch.device("cpu")
    with torch.inference_mode():
        first = module.head_slopes(0, cpu)
    assert module.head_slopes(1, cpu) is first and not first.is_inference()
    assert first.tolist() == [2.0**-4, 2.0**-8]
    rows = module.rows((3, 3), 0, 0, 10, torch.float32, cpu)  # uses them outside inference mode
    torch.testing.assert_close(rows, module((3, 3), 0, dtype=torch.float32, device=cpu))

def test_learned_slopes_differ_per_layer():
    module, bias_layer0 = position_bias((3, 3), alibi_slopes="learned", layer_index=0)
    bias_layer1 = module((3, 3), 1, dtype=torch.float32, device=torch.device("cpu"))
    assert module.slopes.shape == (2, 2)
    distance = alibi_distance_matrix(3, 3)
    for layer, bias in enumerate([bias_layer0, bias_layer1]):
        for head in range(2):
            expected = -module.slopes[layer, head].detach() * distance
            assert torch.allclose(bias[0, head, 1:, 1:].detach(), expected)


def test_manhattan_unnormalised_option_reaches_the_bias():
    _, bias = position_bias((2, 5), alibi_metric="manhattan", alibi_wrap=False, alibi_normalize=False)
    assert bias[0, 0, 1 + 0, 1 + 9].item() == pytest.approx(-5.0)


def test_jitter_adds_fresh_noise_of_the_requested_std():
    module, noisy = position_bias((8, 8), alibi_jitter=0.5)
    again = module((8, 8), 0, dtype=torch.float32, device=torch.device("cpu"))
    clean = -alibi_distance_matrix(8, 8)
    noise = noisy[0, 0, 1:, 1:] - clean
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)
    assert not torch.equal(noisy, again)


@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("alibi_metric", "cosine", "'euclidean', 'manhattan'"),
        ("alibi_slopes", "random", "'constant', 'geometric', 'learned'"),
    ],
)
def test_unknown_option_names_allowed_values(option, value, allowed):
    with pytest.raises(ValueError, match=allowed):
        AlibiDinov2Config(**{option: value})


def test_negative_jitter_is_rejected():
    with pytest.raises(ValueError, match="alibi_jitter"):
        AlibiDinov2Config(alibi_jitter=-0.1)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(alibi_wrap=False, alibi_metric="manhattan"), dict(alibi_slopes="geometric"),
     dict(alibi_slopes="learned", alibi_normalize=False)],
    ids=["default", "manhattan-unwrapped", "geometric", "learned-unnormalised"],
)
@pytest.mark.parametrize("grid", [(3, 4), (5, 2), (1, 6)])
def test_mirrored_rows_are_the_bias_against_mirrored_keys(options, grid):
    """Rows from windows of the offset table, against the keys with their patches last to first, for blocks that
    start inside the prefix, inside a grid row and on a row boundary; one buffer may take every block."""
    module, bias = position_bias(grid, num_register_tokens=2, layer_index=1, **options)
    num_tokens = 3 + grid[0] * grid[1]
    expected = mirror_patch_tokens(bias.detach(), 3, dim=-1)
    table = module.offset_table(grid, 1, torch.float32, torch.device("cpu")).detach()
    assert table.shape == (bias.shape[1], 2 * grid[0] - 1, 2 * grid[1] - 1)
    buffer = torch.full((bias.shape[1], 7, 24), float("nan"))
    blocks = [(0, num_tokens), (1, 8), (5, min(12, num_tokens)), (3, 3 + grid[1]), (num_tokens - 2, num_tokens)]
    for start, stop in blocks:
        for out in (None, buffer):
            rows = module.mirrored_rows(table, grid, start, stop, out if stop - start <= 7 else None)
            assert rows.shape == (1, bias.shape[1], stop - start, num_tokens) and rows.stride(-2) % 8 == 0
            torch.testing.assert_close(rows, expected[:, :, start:stop], atol=1e-6, rtol=0)
    assert torch.equal(mirror_patch_tokens(mirror_patch_tokens(bias, 3, dim=-1), 3, dim=-1), bias)


@pytest.mark.parametrize("slopes", ["constant", "geometric", "learned"])
def test_offset_table_is_made_once_for_fixed_slopes(slopes):
    """Fixed slopes give the same table in every layer: one cached tensor per grid; learned slopes one per layer."""
    module, _ = position_bias((4, 5), num_register_tokens=0, layer_index=0, alibi_slopes=slopes)
    cpu = torch.device("cpu")
    tables = [module.offset_table((4, 5), layer, torch.float32, cpu) for layer in (0, 1, 0)]
    if slopes == "learned":
        with torch.no_grad():
            module.slopes.copy_(torch.rand_like(module.slopes) + 0.5)
        first, second = (module.offset_table((4, 5), layer, torch.float32, cpu) for layer in (0, 1))
        assert not torch.equal(first, second)
        assert first is not module.offset_table((4, 5), 0, torch.float32, cpu)
    else:
        assert tables[0] is tables[1] is tables[2]
        assert module.offset_table((5, 4), 0, torch.float32, cpu) is not tables[0]
