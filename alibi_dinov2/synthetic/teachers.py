"""Synthetic teachers for the quickstart: small DINOv2 and DINOv3 models with random content weights, wired by hand
so that their features leak patch positions (as pretrained DINOv2 and DINOv3 features do) and depend on each patch's
neighbourhood (as an ALiBi bias would make them), with no download.

* DINOv2 (`build_synthetic_teacher`): the learned position embedding holds smooth ramps (the leak) and a periodic
  code that queries and keys read (the neighbourhood).
* DINOv3 (`build_synthetic_dinov3_teacher`): no position embedding; RoPE alone does both. Queries and keys read one
  constant channel, so that RoPE turns their products into a cosine series of the patches' offset (the
  neighbourhood); in a second head each patch's rotated query meets the unrotated keys of four registers, which
  carry +x, -x, +y and -y: its attention to them, and so what it reads from them, follows its absolute position (the
  leak).

Both write a stock transformers folder (`Dinov2WithRegistersModel`, `DINOv3ViTModel`) that the converter reads.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


TEACHER_ARCHS = ("dinov2", "dinov3")
SYNTHETIC_NOTES = {
    "dinov2": (
        "SYNTHETIC TEACHER: a small DINOv2 with random content weights, wired by hand: its position embedding holds "
        "smooth 2D ramps (the positional leak of pretrained DINOv2 features) and codes that make every patch attend "
        "to its neighbourhood (an ALiBi-like distance bias, so its features depend on the patches around each one). "
        "It is not a pretrained model and its features carry no semantics."
    ),
    "dinov3": (
        "SYNTHETIC TEACHER: a small DINOv3 with random content weights, wired by hand: through its RoPE, every patch "
        "attends to its neighbourhood (an ALiBi-like distance bias, so its features depend on the patches around "
        "each one) and reads from four registers in proportions set by its absolute position (the positional leak "
        "of pretrained DINOv3 features). It is not a pretrained model and its features carry no semantics."
    ),
}

# The synthetic teachers' attention logit between patches is about -TEACHER_SLOPE * (|dx| + |dy|) / grid: the bias
# of normalised Manhattan ALiBi with this slope (wrapped for DINOv2, whose code is periodic; not for DINOv3, whose
# RoPE is not). Their ALiBi students start from the same bias (STUDENT_ALIBI_OPTIONS, learned slopes initialised by
# `student_alibi_slope`); a NoPE student has no way to model it.
TEACHER_SLOPE = 14.0
TEACHER_HARMONICS = (1, 3)
STUDENT_ALIBI_OPTIONS = {
    "dinov2": {"alibi_metric": "manhattan", "alibi_slopes": "learned"},
    "dinov3": {"alibi_metric": "manhattan", "alibi_slopes": "learned", "alibi_wrap": False},
}
# The DINOv3 teacher's RoPE: base 100, 32-dimensional heads; frequency i (of 8 per axis) turns by 2 pi * 100^(-i/8)
# per unit of the [-1, 1] patch coordinate. Frequencies 0 and 2 make the neighbourhood series, 3 the positional
# read-out (an angle within +-1.1 rad, where its sine is monotonic), and 7, nearly still, the constant logits.
DINOV3_ROPE_THETA = 100.0
DINOV3_NEIGHBOURHOOD_FREQUENCIES = (0, 2)
DINOV3_READOUT_FREQUENCY = 3
DINOV3_CONSTANT_FREQUENCY = 7


def student_alibi_slope(arch: str, grid: int) -> float:
    """The learned slope an ALiBi student of the `arch` teacher starts from: the teacher's bias
    -TEACHER_SLOPE * d / grid, written as ALiBi's -m * d / d_max on the `grid x grid` training grid."""
    from alibi_attention import normalizing_divisor

    options = STUDENT_ALIBI_OPTIONS[arch]
    return (
        TEACHER_SLOPE
        * normalizing_divisor(grid, grid, options["alibi_metric"], options.get("alibi_wrap", True))
        / grid
    )


def save_teacher(model, folder, arch: str):
    """Write the teacher as a transformers folder with a README that says what it is; returns the model."""
    folder = Path(folder)
    model.save_pretrained(folder)
    title = {"dinov2": "DINOv2", "dinov3": "DINOv3"}[arch]
    (folder / "README.md").write_text(f"# Synthetic {title} teacher\n\n{SYNTHETIC_NOTES[arch]}\n", encoding="utf-8")
    return model


def wire_patch_embedding(projection, reserved, stabiliser: int, gain: float, stabiliser_value: float) -> None:
    """Patch embedding: the content channels at `gain` times their random weights, the reserved ones silent but for
    a constant pair (+S, -S, the bias) that dominates every patch token's LayerNorm scale."""
    projection.weight.mul_(gain)
    projection.weight[reserved] = 0
    projection.bias[stabiliser] = stabiliser_value
    projection.bias[stabiliser + 1] = -stabiliser_value


def wire_content_paths(v_proj, o_proj, mlp_in, mlp_out, reserved, scale: float, gain: float, mix: float) -> None:
    """Values, outputs and MLP read and write the content channels only; each layer adds about `mix` times the
    (attention-averaged) content."""
    hidden_size = v_proj.weight.shape[1]
    torch.nn.init.normal_(v_proj.weight, std=hidden_size**-0.5)
    torch.nn.init.normal_(o_proj.weight, std=mix * scale * hidden_size**-0.5)
    mlp_in.weight.mul_(scale / gain / (0.02 * math.sqrt(hidden_size)))
    mlp_out.weight.mul_(gain)
    for reader in (v_proj, mlp_in):
        reader.weight[:, reserved] = 0
    for writer in (o_proj, mlp_out):
        writer.weight[reserved] = 0


def smooth_position_embedding(grid: int, hidden_size: int, amplitude: float, channels: int = 8) -> torch.Tensor:
    """A position embedding `(1, 1 + grid * grid, hidden_size)` whose first `channels` channels hold cosines and
    sines of smooth left-right and up-down ramps (angles, so that LayerNorm cannot wash them out); zero elsewhere,
    and zero at the CLS position."""
    ramp = torch.linspace(0.0, 1.0, grid)
    x = ramp[None, :].expand(grid, grid).reshape(-1)
    y = ramp[:, None].expand(grid, grid).reshape(-1)
    embedding = torch.zeros(1, 1 + grid * grid, hidden_size)
    for index in range(channels // 4):
        frequency = (index + 1) * math.pi / 2
        for offset, coordinate in enumerate((x, y)):
            embedding[0, 1:, 4 * index + 2 * offset] = amplitude * torch.cos(frequency * coordinate)
            embedding[0, 1:, 4 * index + 2 * offset + 1] = amplitude * torch.sin(frequency * coordinate)
    return embedding


def periodic_position_code(grid: int, harmonics=TEACHER_HARMONICS) -> torch.Tensor:
    """`(grid * grid, 4 * len(harmonics))`: for each harmonic k, cos and sin of 2 pi k x, then of 2 pi k y, with
    x, y = column, row / grid. Dot products of two patches' codes depend only on their wrapped offset."""
    steps = torch.arange(grid) / grid
    x = steps[None, :].expand(grid, grid).reshape(-1)
    y = steps[:, None].expand(grid, grid).reshape(-1)
    angles = [2 * math.pi * k * coordinate for k in harmonics for coordinate in (x, y)]
    return torch.stack([f(angle) for angle in angles for f in (torch.cos, torch.sin)], dim=1)


def distance_bias_coefficients(slope: float, harmonics=TEACHER_HARMONICS, frequencies=None, span: float = 0.5):
    """Weights a_k such that sum_k a_k (cos 2 pi k u - 1) ~ -slope |u| for wrapped offsets u in [0, 1/2]: the ALiBi
    bias along one axis as a short cosine series (least squares, weighted by the attention exp(-slope u)). With
    `frequencies` (angular, per unit of u) instead of harmonics, the series `cos(frequency u) - 1` over [0, span]."""
    u = np.linspace(0.0, span, 501)
    weight = np.exp(-slope * u / 2)
    frequencies = [2 * np.pi * k for k in harmonics] if frequencies is None else frequencies
    basis = np.stack([np.cos(frequency * u) - 1 for frequency in frequencies], axis=1)
    return np.linalg.lstsq(basis * weight[:, None], -slope * u * weight, rcond=None)[0].tolist()


def build_synthetic_teacher(
    folder,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 2,
    grid: int = 8,
    slope: float = TEACHER_SLOPE,
    mix: float = 2.0,
    seed: int = 0,
):
    """Write a synthetic teacher (a stock `Dinov2WithRegistersModel`, 4 registers) to `folder` and return it.

    Its features leak position and depend on each patch's neighbourhood. Random weights, then, by hand:

    * position embedding (stored for a `grid x grid` input, the training grid): 8 channels of smooth ramps (the
      leak), the periodic code of `periodic_position_code`, and the negatives of both, so that every token's
      channel mean stays 0 and LayerNorm does not smear position over the other channels;
    * queries and keys read only the code, so that the attention logit between two patches is
      `sum_k a_k [cos 2 pi k dx + cos 2 pi k dy]`, i.e. about `-slope * (|dx| + |dy|) / grid` (wrapped offsets):
      every patch attends to its neighbourhood, as ALiBi would. The CLS and register tokens carry a marker channel
      that gives them a large negative logit, as their zero ALiBi bias does not keep them out;
    * values, outputs and MLPs read and write only the other (content) channels; each layer adds about `mix`
      times the patch's content, averaged over its neighbourhood;
    * a constant pair of channels (+S, -S, the patch-embedding bias) dominates every token's LayerNorm scale, so
      that the attention width and the ramps do not vary from patch to patch, nor when a student drops the
      position embedding;
    * the final LayerNorm shows the ramps and the content channels only.
    """
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        patch_size=14,
        image_size=14 * grid,
        num_register_tokens=4,
    )
    model = Dinov2WithRegistersModel(config).eval()
    code = periodic_position_code(grid)
    ramps = 8  # the channels of smooth_position_embedding
    positional = ramps + code.shape[1]  # ramps and code; their negatives follow
    code_channels = slice(ramps, positional)
    stabiliser, marker = 2 * positional, 2 * positional + 2
    reserved = slice(0, marker + 1)  # every channel but the content ones
    # The residual stream runs at 10x DINOv2's initial scale, so that a step of the students' optimiser is small.
    gain, stabiliser_value, ramp_value, code_value, marker_value = 10.0, 320.0, 5.0, 10.0, 80.0
    head_dim = hidden_size // num_attention_heads
    stabiliser_gain = 0.05  # norm1's weight on the stabiliser: enough for the marker logit, too little to matter
    with torch.no_grad():
        embedding = smooth_position_embedding(grid, hidden_size, ramp_value, channels=ramps)
        embedding[0, 1:, code_channels] = code_value * code
        embedding[0, :, positional : 2 * positional] = -embedding[0, :, :positional]
        # LayerNorm's divisor for a patch token, and the LayerNorm'd stabiliser and marker (of a prefix token)
        scale = math.sqrt((2 * stabiliser_value**2 + embedding[0, 1:].pow(2).sum(-1).mean().item()) / hidden_size)
        normed_stabiliser, normed_marker = stabiliser_gain * stabiliser_value / scale, math.sqrt(hidden_size)
        embeddings = model.embeddings
        embeddings.position_embeddings.copy_(embedding)
        wire_patch_embedding(embeddings.patch_embeddings.projection, reserved, stabiliser, gain, stabiliser_value)
        embeddings.cls_token[..., reserved] = 0
        embeddings.cls_token[..., marker] = marker_value
        embeddings.register_tokens[..., marker] = marker_value
        # query . key / sqrt(head_dim): a_k per code pair; -30 from a patch to a prefix token
        coefficients = distance_bias_coefficients(slope)
        code_weights = [math.sqrt(abs(a) * math.sqrt(head_dim)) * scale / code_value for a in coefficients]
        marker_weight = math.sqrt(30.0 * math.sqrt(head_dim) / (normed_stabiliser * normed_marker))
        for layer in model.encoder.layer:
            attention = layer.attention
            attention.q_proj.weight.zero_()
            attention.k_proj.weight.zero_()
            for head in range(num_attention_heads):
                rows = head * head_dim
                for index in range(code.shape[1]):
                    weight, sign = code_weights[index // 4], math.copysign(1.0, coefficients[index // 4])
                    attention.q_proj.weight[rows + index, ramps + index] = weight
                    attention.k_proj.weight[rows + index, ramps + index] = sign * weight
                attention.q_proj.weight[rows + head_dim - 1, stabiliser] = marker_weight
                attention.k_proj.weight[rows + head_dim - 1, marker] = -marker_weight
            layer.norm1.weight[reserved] = 0
            layer.norm1.weight[code_channels] = 1
            layer.norm1.weight[stabiliser] = stabiliser_gain
            layer.norm1.weight[marker] = 1
            layer.norm2.weight[reserved] = 0
            wire_content_paths(
                attention.v_proj, attention.o_proj, layer.mlp.fc1, layer.mlp.fc2, reserved, scale, gain, mix
            )
        model.layernorm.weight[ramps : marker + 1] = 0
    return save_teacher(model, folder, "dinov2")




def _normed(token: torch.Tensor) -> torch.Tensor:
    """LayerNorm of one `(hidden_size,)` token, without weight and bias."""
    return F.layer_norm(token, token.shape)


def build_synthetic_dinov3_teacher(
    folder,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 2,
    grid: int = 7,
    slope: float = TEACHER_SLOPE,
    mix: float = 2.0,
    readout: float = 1.0,
    copies: int = 2,
    seed: int = 0,
):
    """Write a synthetic teacher (a stock `DINOv3ViTModel`, 4 registers, RoPE, 16 px patches) to `folder` and return
    it. Its features leak position and depend on each patch's neighbourhood. Random weights, then, by hand:

    * channels: `copies` channels each of the x and y ramps and their negatives (written by the attention; with 2,
      the distillation's `--blank_channels auto` blanks all 4 ramps in the target, with more the leak scores higher,
      0.82 for 1, 0.92 for 2, 0.97 for 4 on 518 px generated images, but the students are asked for unblanked ramps),
      four register channels (register r holds R in channel r), a constant pair (+S, -S) that dominates every
      patch's LayerNorm scale, a marker of the prefix tokens, then the content channels;
    * head 0 (the neighbourhood): queries and keys of patches read the constant channel into RoPE frequencies 0 and
      2 of both axes, so that their product is `sum_k a_k [cos w_k dy + cos w_k dx]`, about
      `-slope * (|dx| + |dy|) / grid` (offsets not wrapped); the marker gives the prefix tokens a logit of -30;
    * head 1 (the leak): a patch's query, on frequency 3 of each axis, meets the keys of the +x / -x / +y / -y
      registers on the partner (sine) dimension, a logit of `+-readout * sin(angle of its x or y)`; a constant logit
      of 12 (frequency 7, nearly unrotated) keeps it on the registers, whose values it writes into the ramp channels;
    * values, outputs and MLPs of head 0 read and write only the content channels, as in the DINOv2 teacher;
    * the final LayerNorm shows the ramps and the content channels only.
    """
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        patch_size=16,
        image_size=16 * grid,
        num_register_tokens=4,
        rope_theta=DINOV3_ROPE_THETA,
    )
    model = DINOv3ViTModel(config).eval()
    head_dim = hidden_size // num_attention_heads
    quarter = head_dim // 4  # RoPE frequencies per axis: dims [0, quarter) turn with y, [quarter, 2 quarter) with x
    # Channels: `copies` x-ramp then y-ramp channels, their negatives, the +x, -x, +y, -y register channels, the
    # stabiliser pair, the marker; content after.
    ramps = 2 * copies
    plus_x, minus_x, plus_y, minus_y = range(2 * ramps, 2 * ramps + 4)
    stabiliser, marker = 2 * ramps + 4, 2 * ramps + 6
    reserved = slice(0, marker + 1)
    gain, stabiliser_value, register_value, marker_value, ramp_gain = 10.0, 320.0, 80.0, 80.0, 2.0
    scale = math.sqrt(2 * stabiliser_value**2 / hidden_size)  # LayerNorm's divisor for a patch token
    normed_stabiliser = stabiliser_value / scale
    with torch.no_grad():
        embeddings = model.embeddings
        wire_patch_embedding(embeddings.patch_embeddings, reserved, stabiliser, gain, stabiliser_value)
        embeddings.cls_token[..., reserved] = 0
        embeddings.cls_token[..., marker] = marker_value
        embeddings.register_tokens[..., reserved] = 0
        embeddings.register_tokens[..., marker] = marker_value
        for index, channel in enumerate((plus_x, minus_x, plus_y, minus_y)):
            embeddings.register_tokens[0, index, channel] = register_value
        register = _normed(embeddings.register_tokens[0, 0])
        normed_marker, normed_register = register[marker].item(), register[plus_x].item()
        frequencies = [4 * math.pi * DINOV3_ROPE_THETA ** (-j / quarter) for j in DINOV3_NEIGHBOURHOOD_FREQUENCIES]
        coefficients = distance_bias_coefficients(slope, frequencies=frequencies, span=1.0)

        def weight(logit, normed_query, normed_key):  # query and key weights giving this logit
            return math.sqrt(abs(logit) * math.sqrt(head_dim) / (normed_query * normed_key))

        constant = head_dim // 2 + quarter + DINOV3_CONSTANT_FREQUENCY  # sine partner of x frequency 7
        read = head_dim  # head 1
        for layer in model.model.layer:
            attention = layer.attention
            q, k = attention.q_proj.weight, attention.k_proj.weight
            q.zero_()
            k.zero_()
            for j, a in zip(DINOV3_NEIGHBOURHOOD_FREQUENCIES, coefficients):
                w = weight(a, normed_stabiliser, normed_stabiliser)
                for dim in (j, quarter + j):
                    q[dim, stabiliser], k[dim, stabiliser] = w, math.copysign(w, a)
            w = weight(30.0, normed_stabiliser, normed_marker)
            q[constant, stabiliser], k[constant, marker] = w, -w
            w = weight(readout, normed_stabiliser, normed_register)
            for axis, (plus, minus) in enumerate(((plus_y, minus_y), (plus_x, minus_x))):
                dim = read + axis * quarter + DINOV3_READOUT_FREQUENCY
                q[dim, stabiliser] = w
                k[dim + head_dim // 2, plus], k[dim + head_dim // 2, minus] = w, -w
            w = weight(12.0, normed_stabiliser, normed_register)
            q[read + constant, stabiliser] = w
            k[read + constant, plus_x : minus_y + 1] = w
            layer.norm1.weight[reserved] = 0
            layer.norm1.weight[plus_x : marker + 1] = 1
            layer.norm1.weight[stabiliser + 1] = 0
            layer.norm2.weight[reserved] = 0
            mlp = layer.mlp
            wire_content_paths(
                attention.v_proj, attention.o_proj, mlp.up_proj, mlp.down_proj, reserved, scale, gain, mix
            )
            v, o = attention.v_proj.weight, attention.o_proj.weight
            v[read:] = 0
            o[:, read:] = 0
            for axis, (plus, minus) in enumerate(((plus_x, minus_x), (plus_y, minus_y))):
                v[read + axis, plus], v[read + axis, minus] = 1.0, -1.0
                channels = slice(axis * copies, (axis + 1) * copies)
                o[channels, read + axis] = ramp_gain
                o[ramps + channels.start : ramps + channels.stop, read + axis] = -ramp_gain
        model.norm.weight[ramps : marker + 1] = 0
    return save_teacher(model, folder, "dinov3")


TEACHER_BUILDERS = {"dinov2": build_synthetic_teacher, "dinov3": build_synthetic_dinov3_teacher}
# Patch size of each synthetic teacher.
TEACHER_PATCH_SIZES = {"dinov2": 14, "dinov3": 16}
