"""convert_checkpoint on DINOv3 sources: Meta's dinov3 layout (with RoPE, and the reference ALiBi layout without it)
reproduces transformers' `DINOv3ViTModel` and an independent eager ViT written here from the raw Meta tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from alibi_dinov2.conversion.convert import convert
from alibi_dinov2.conversion.model_card import _comparison_model
from alibi_dinov2.conversion.state_dicts import (
    CheckpointKeyError,
    convert_dinov3_state_dict,
    detect_format,
    rope_theta_of_periods,
)
from alibi_dinov2.errors import InputError
from test_convert_checkpoint import attention_residual, loop_distance_matrix, pixels, shapes_of


# 2 layers, 2 heads of 16 dims (4 RoPE periods), 16 px patches.
TINY_DINOV3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16)


def hf_dinov3(registers=4, gated=False, seed=0, **overrides):
    """A transformers DINOv3 with random weights everywhere (biases, norms and LayerScale too, so that a mix-up
    shows)."""
    torch.manual_seed(seed)
    kwargs = dict(
        TINY_DINOV3, num_register_tokens=registers, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu"
    )
    model = DINOv3ViTModel(DINOv3ViTConfig(**{**kwargs, **overrides}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("bias", "lambda1", "mask_token")) or ".norm" in name or name.startswith("norm."):
                parameter.normal_(0.5 if "norm" in name or "lambda1" in name else 0.0, 0.2)
    return model.eval()


def meta_periods(head_dim, base=100.0):
    """Meta's RoPE periods: base ** (2 i / (head_dim / 2)) for i < head_dim / 4."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def to_meta_dinov3_keys(model, rope=True):
    """Write a transformers DINOv3 state dict in Meta's dinov3 layout: q, k, v stacked in `attn.qkv` with a random
    key third of the bias that `bias_mask` zeroes, `storage_tokens`, `ls1` / `ls2`, `fc1` / `fc2` or SwiGLU
    `w1` / `w2` / `w3`; `rope=False` leaves out `rope_embed.periods`, as the reference ALiBi-DINOv3 does."""
    source, config = model.state_dict(), model.config
    hidden = config.hidden_size
    out = {
        "cls_token": source["embeddings.cls_token"],
        "mask_token": source["embeddings.mask_token"].reshape(1, hidden),
        "patch_embed.proj.weight": source["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": source["embeddings.patch_embeddings.bias"],
        "norm.weight": source["norm.weight"],
        "norm.bias": source["norm.bias"],
    }
    if config.num_register_tokens:
        out["storage_tokens"] = source["embeddings.register_tokens"]
    if rope:
        out["rope_embed.periods"] = meta_periods(hidden // config.num_attention_heads, config.rope_theta)
    mlp_names = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if config.use_gated_mlp else {
        "fc1": "up_proj", "fc2": "down_proj"}
    for index in range(config.num_hidden_layers):
        hf, meta = f"model.layer.{index}.", f"blocks.{index}."
        for name in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                out[f"{meta}{name}.{kind}"] = source[f"{hf}{name}.{kind}"]
        attention = hf + "attention."
        out[meta + "attn.qkv.weight"] = torch.cat([source[f"{attention}{p}_proj.weight"] for p in "qkv"])
        key_bias = torch.randn(hidden)  # masked away in Meta's model: must not reach the converted one
        out[meta + "attn.qkv.bias"] = torch.cat(
            [source[attention + "q_proj.bias"], key_bias, source[attention + "v_proj.bias"]]
        )
        out[meta + "attn.qkv.bias_mask"] = torch.cat([torch.ones(hidden), torch.zeros(hidden), torch.ones(hidden)])
        out[meta + "attn.proj.weight"] = source[attention + "o_proj.weight"]
        out[meta + "attn.proj.bias"] = source[attention + "o_proj.bias"]
        out[meta + "ls1.gamma"] = source[hf + "layer_scale1.lambda1"]
        out[meta + "ls2.gamma"] = source[hf + "layer_scale2.lambda1"]
        for meta_name, hf_name in mlp_names.items():
            for kind in ("weight", "bias"):
                out[f"{meta}mlp.{meta_name}.{kind}"] = source[f"{hf}mlp.{hf_name}.{kind}"]
    return {key: value.clone() for key, value in out.items()}


def rope_tables(periods, height, width):
    """cos, sin `(h * w, head_dim)` of Meta's RoPE: patch centres in [-1, 1] per axis, angles 2 pi coord / period,
    y angles then x angles, the whole repeated twice."""
    rows = []
    for y in range(height):
        for x in range(width):
            coords = (2 * (y + 0.5) / height - 1, 2 * (x + 0.5) / width - 1)
            angles = torch.cat([2 * math.pi * c / periods for c in coords])
            rows.append(torch.cat([angles, angles]))
    angles = torch.stack(rows)
    return angles.cos(), angles.sin()


def rotate(tensor, cos, sin):
    half = tensor.shape[-1] // 2
    return tensor * cos + torch.cat([-tensor[..., half:], tensor[..., :half]], dim=-1) * sin


def reference_dinov3_forward(state_dict, pixel_values, num_heads, slopes=None, wrap=True, eps=1e-5):
    """An eager ViT written from a Meta dinov3 state dict: CLS then storage tokens, the masked qkv bias, RoPE on
    patch queries and keys when `rope_embed.periods` is there, and with `slopes` (layers x heads) a 2D ALiBi bias
    from explicit loops."""
    weight = state_dict["patch_embed.proj.weight"]
    x = F.conv2d(pixel_values, weight, state_dict["patch_embed.proj.bias"], stride=weight.shape[-1])
    batch, channels, height, width = x.shape
    prefix = [state_dict["cls_token"].expand(batch, -1, -1)]
    if "storage_tokens" in state_dict:
        prefix.append(state_dict["storage_tokens"].expand(batch, -1, -1))
    x = torch.cat(prefix + [x.flatten(2).transpose(1, 2)], dim=1)
    num_prefix, num_tokens, head_dim = x.shape[1] - height * width, x.shape[1], channels // num_heads
    distance = loop_distance_matrix(height, width, num_prefix, wrap)
    rope = "rope_embed.periods" in state_dict
    if rope:
        cos, sin = rope_tables(state_dict["rope_embed.periods"], height, width)
    layers = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    for layer in range(layers):
        p = lambda name: state_dict[f"blocks.{layer}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (channels,), p("norm1.weight"), p("norm1.bias"), eps)
        qkv = y @ p("attn.qkv.weight").T + p("attn.qkv.bias") * p("attn.qkv.bias_mask")
        q, k, v = qkv.reshape(batch, num_tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        if rope:
            q = torch.cat([q[:, :, :num_prefix], rotate(q[:, :, num_prefix:], cos, sin)], dim=2)
            k = torch.cat([k[:, :, :num_prefix], rotate(k[:, :, num_prefix:], cos, sin)], dim=2)
        x = attention_residual(x, q, k, v, p, None if slopes is None else -slopes[layer].reshape(-1, 1, 1) * distance)
        y = F.layer_norm(x, (channels,), p("norm2.weight"), p("norm2.bias"), eps)
        if f"blocks.{layer}.mlp.w1.weight" in state_dict:
            gate = F.silu(y @ p("mlp.w1.weight").T + p("mlp.w1.bias"))
            hidden = gate * (y @ p("mlp.w2.weight").T + p("mlp.w2.bias"))
            out = hidden @ p("mlp.w3.weight").T + p("mlp.w3.bias")
        else:
            out = F.gelu(y @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        x = x + p("ls2.gamma") * out
    return F.layer_norm(x, (channels,), state_dict["norm.weight"], state_dict["norm.bias"], eps)


def load_into_transformers(state_dict, architecture):
    """transformers' own DINOv3 holding a converted state dict, every key matched (strict)."""
    model = DINOv3ViTModel(DINOv3ViTConfig(**architecture)).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


SIZES = [(64, 48), (48, 80)]  # grids 4 x 3 and 3 x 5


# --- Meta's dinov3 layout with RoPE, against transformers and the eager reference ----------------------------------


@pytest.mark.parametrize("registers, gated", [(4, False), (4, True), (0, True)])
def test_meta_dinov3_keys_map_onto_transformers_dinov3(registers, gated):
    source = hf_dinov3(registers=registers, gated=gated)
    meta = to_meta_dinov3_keys(source)
    assert detect_format("dinov3.pth", meta) == "dinov3"
    converted, architecture = convert_dinov3_state_dict(meta)
    assert architecture["num_attention_heads"] == 2  # from the 4 RoPE periods: 16-dimensional heads
    assert architecture["rope_theta"] == 100.0 and architecture["key_bias"] is False
    assert architecture["use_gated_mlp"] == gated and architecture["num_register_tokens"] == registers
    assert architecture["intermediate_size"] == 64
    model = load_into_transformers(converted, architecture)
    for size in SIZES:
        x = pixels(*size)
        with torch.no_grad():
            ours = model(x).last_hidden_state
            torch.testing.assert_close(ours, source(x).last_hidden_state, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours, reference_dinov3_forward(meta, x, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", ["model.", "backbone.", "model.backbone."])
def test_prefixed_dinov3_keys_and_an_unmasked_key_bias(prefix):
    source = hf_dinov3(key_bias=True)
    meta = to_meta_dinov3_keys(source)
    for index in range(2):
        meta[f"blocks.{index}.attn.qkv.bias_mask"].fill_(1.0)
        meta[f"blocks.{index}.attn.qkv.bias"][32:64] = source.state_dict()[
            f"model.layer.{index}.attention.k_proj.bias"
        ]
    prefixed = {prefix + key: value for key, value in meta.items()}
    assert detect_format("dinov3.pth", prefixed) == "dinov3"
    converted, architecture = convert_dinov3_state_dict(prefixed)
    assert architecture["key_bias"] is True
    model = load_into_transformers(converted, architecture)
    x = pixels(64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, source(x).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x).last_hidden_state, reference_dinov3_forward(meta, x, 2), atol=1e-5, rtol=0)


def test_rope_base_is_read_from_the_periods_and_other_forms_are_refused():
    assert rope_theta_of_periods(meta_periods(64, 100.0), 64) == 100.0
    assert rope_theta_of_periods(meta_periods(128, 1000.0), 128) == 1000.0
    min_max = torch.logspace(math.log10(0.5), math.log10(50.0), 16)  # periods between a minimum and a maximum
    with pytest.raises(CheckpointKeyError, match="rope_theta"):
        rope_theta_of_periods(min_max, 64)
    with pytest.raises(CheckpointKeyError, match="--num_heads"):
        rope_theta_of_periods(meta_periods(64), 32)
    # Such a RoPE can still be left out: the rest of the checkpoint converts.
    meta = to_meta_dinov3_keys(hf_dinov3())
    meta["rope_embed.periods"] = torch.logspace(math.log10(0.5), math.log10(50.0), 4)
    with pytest.raises(CheckpointKeyError, match="--source_position alibi"):
        convert_dinov3_state_dict(meta)
    converted, architecture = convert_dinov3_state_dict(meta, read_rope=False)
    assert "rope_theta" not in architecture and architecture["num_attention_heads"] == 2
    load_into_transformers(converted, architecture)


def test_unexpected_dinov3_keys_and_a_bad_bias_mask_are_named():
    meta = to_meta_dinov3_keys(hf_dinov3())
    with pytest.raises(CheckpointKeyError, match="unexpected key.*blocks.0.attn.qkv.scale, head.weight"):
        convert_dinov3_state_dict(
            dict(meta, **{"head.weight": torch.zeros(2, 32), "blocks.0.attn.qkv.scale": torch.ones(1)})
        )
    meta["blocks.1.attn.qkv.bias_mask"][:4] = 0
    with pytest.raises(CheckpointKeyError, match="bias_mask"):
        convert_dinov3_state_dict(meta)


# --- the released layouts at full size ----------------------------------------------------------------------------


def released_dinov3_layout(
    hidden, layers, registers, gated, mlp, rope=True, patch=16, head_dim=64, qkv_bias=True, local_cls_norm=False
):
    """Key -> shape of a state dict in Meta's dinov3 layout, written from the published layout (not from a model
    class); `rope=False`: the reference ALiBi-DINOv3 (`rope_embed` removed); `qkv_bias=False`: no qkv bias nor its
    mask (ViT-7B/16); `local_cls_norm`: the training-only norm of the models trained with untied global and local
    CLS norms (ViT-7B/16, the SAT-493M ViT-L/16)."""
    shapes = {
        "cls_token": (1, 1, hidden),
        "mask_token": (1, hidden),
        "patch_embed.proj.weight": (hidden, 3, patch, patch),
        "patch_embed.proj.bias": (hidden,),
        "norm.weight": (hidden,),
        "norm.bias": (hidden,),
    }
    if registers:
        shapes["storage_tokens"] = (1, registers, hidden)
    if rope:
        shapes["rope_embed.periods"] = (head_dim // 4,)
    if local_cls_norm:
        shapes["local_cls_norm.weight"] = shapes["local_cls_norm.bias"] = (hidden,)
    for index in range(layers):
        block = f"blocks.{index}."
        for name, shape in {
            "norm1.weight": (hidden,), "norm1.bias": (hidden,), "norm2.weight": (hidden,), "norm2.bias": (hidden,),
            "attn.qkv.weight": (3 * hidden, hidden), "attn.qkv.bias": (3 * hidden,),
            "attn.qkv.bias_mask": (3 * hidden,), "attn.proj.weight": (hidden, hidden), "attn.proj.bias": (hidden,),
            "ls1.gamma": (hidden,), "ls2.gamma": (hidden,),
        }.items():
            if qkv_bias or not name.startswith("attn.qkv.bias"):
                shapes[block + name] = shape
        names = {"w1": (mlp, hidden), "w2": (mlp, hidden), "w3": (hidden, mlp)} if gated else {
            "fc1": (mlp, hidden), "fc2": (hidden, mlp)}
        for name, shape in names.items():
            shapes[f"{block}mlp.{name}.weight"] = shape
            shapes[f"{block}mlp.{name}.bias"] = shape[:1]
    return shapes


def full_size_state_dict(shapes):
    """Meta-device tensors of `shapes`, except the two whose values the converter reads: Meta's RoPE periods and
    the key-masking bias masks."""
    hidden = shapes["norm.weight"][0]
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    for key in shapes:
        if key.endswith("bias_mask"):
            state_dict[key] = torch.cat([torch.ones(hidden), torch.zeros(hidden), torch.ones(hidden)])
    if "rope_embed.periods" in shapes:
        state_dict["rope_embed.periods"] = meta_periods(4 * shapes["rope_embed.periods"][0])
    return state_dict


@pytest.mark.parametrize(
    "hidden, layers, gated, mlp",
    [(384, 12, False, 1536), (384, 12, True, 1536), (768, 12, False, 3072), (1024, 24, False, 4096),
     (1280, 32, True, 5120)],
    ids=["S", "S+", "B", "L", "H+"],
)
def test_every_dinov3_size_converts_with_its_released_shapes(hidden, layers, gated, mlp):
    """Meta's dinov3 ViT-S/16 to ViT-H+/16 (4 storage tokens, masked key bias), on the meta device: every key maps
    onto transformers' DINOv3ViTModel of the inferred configuration, strictly, with the same number of weights."""
    shapes = released_dinov3_layout(hidden, layers, 4, gated, mlp)
    assert len(shapes) == 8 + layers * (17 if gated else 15)
    converted, architecture = convert_dinov3_state_dict(full_size_state_dict(shapes))
    assert architecture["num_attention_heads"] == hidden // 64 and architecture["num_hidden_layers"] == layers
    assert architecture["intermediate_size"] == mlp and architecture["use_gated_mlp"] == gated
    assert (architecture["num_register_tokens"], architecture["key_bias"], architecture["rope_theta"]) == (
        4,
        False,
        100.0,
    )
    with torch.device("meta"):
        model = DINOv3ViTModel(DINOv3ViTConfig(**architecture))
    assert shapes_of(model.state_dict()) == shapes_of(converted)
    masked_key_bias = layers * hidden
    total = sum(math.prod(shape) for key, shape in shapes.items() if not key.endswith(("bias_mask", "periods")))
    assert sum(p.numel() for p in model.state_dict().values()) == total - masked_key_bias


@pytest.mark.parametrize(
    "hidden, layers, gated, mlp, head_dim, qkv_bias",
    [(4096, 40, True, 8192, 128, False), (1024, 24, False, 4096, 64, True)],
    ids=["7B", "L-SAT493M"],
)
def test_the_training_only_local_cls_norm_is_dropped_with_one_note(caplog, hidden, layers, gated, mlp, head_dim,
                                                                    qkv_bias):
    """Meta's ViT-7B/16 and SAT-493M ViT-L/16 carry `local_cls_norm.*` (used on local crops in training only): it is
    dropped with one warning naming both keys, the rest maps strictly onto transformers' DINOv3ViTModel, and any
    other extra key is still refused."""
    shapes = released_dinov3_layout(hidden, layers, 4, gated, mlp, head_dim=head_dim, qkv_bias=qkv_bias,
                                    local_cls_norm=True)
    with caplog.at_level("WARNING", logger="alibi_dinov2.conversion"):
        converted, architecture = convert_dinov3_state_dict(full_size_state_dict(shapes))
    notes = [record.getMessage() for record in caplog.records if "local_cls_norm" in record.getMessage()]
    assert len(notes) == 1 and "local_cls_norm.bias, local_cls_norm.weight" in notes[0] and "\n" not in notes[0]
    assert architecture["num_attention_heads"] == hidden // head_dim
    assert (architecture["query_bias"], architecture["key_bias"]) == (qkv_bias, False)
    with torch.device("meta"):
        model = DINOv3ViTModel(DINOv3ViTConfig(**architecture))
    assert shapes_of(model.state_dict()) == shapes_of(converted)
    assert not any("local_cls_norm" in key for key in converted)

    with_head = dict(full_size_state_dict(shapes), **{"head.weight": torch.empty(3, hidden, device="meta")})
    with pytest.raises(CheckpointKeyError, match=r"1 unexpected key\(s\) in the dinov3 state dict: head\.weight \("):
        convert_dinov3_state_dict(with_head)


def test_refusals_name_the_file_on_one_line_without_a_traceback(tmp_path, capsys):
    """Every refusal of the command is one line on stderr naming the file, with exit status 2."""
    import convert_checkpoint

    meta = to_meta_dinov3_keys(hf_dinov3())
    save_meta(tmp_path, dict(meta, **{"head.weight": torch.zeros(2, 32)}), "with_head.pth")
    torch.save({"cls_token": torch.zeros(1)}, tmp_path / "not_a_vit.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "empty_folder").mkdir()
    cases = {
        "with_head.pth": ["--num_heads", "2"],
        "not_a_vit.pth": [],
        "broken.safetensors": [],
        "empty_folder": [],
        "missing.pth": [],
    }
    for name, options in cases.items():
        with pytest.raises(SystemExit) as stop:
            convert_checkpoint.run_command(convert_checkpoint.main, [str(tmp_path / name), str(tmp_path / "out"),
                                                                     *options])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert ": error: " in err and name in err, err
    save_meta(tmp_path, meta, "good.pth")
    with pytest.raises(SystemExit):
        convert_checkpoint.run_command(convert_checkpoint.main, [str(tmp_path / "good.pth"), str(tmp_path / "out"),
                                                                 "--alibi_jitter", "-1"])
    err = capsys.readouterr().err
    assert "good.pth" in err and "alibi_jitter" in err and err.count("\n") == 1


# --- ALiBi-DINOv3 models -------------------------------------------------------------------------------------------


def save_meta(tmp_path, state_dict, name="dinov3_tiny.pth"):
    path = tmp_path / name
    torch.save(state_dict, path)
    return path


def assert_matches(model, reference, sizes=SIZES, atol=1e-5):
    for size in sizes:
        x = pixels(*size)
        with torch.no_grad():
            torch.testing.assert_close(model(x).last_hidden_state, reference(x), atol=atol, rtol=0)


@pytest.mark.parametrize("prefix", ["", "model.", "backbone."])
@pytest.mark.parametrize("gated", [False, True])
def test_reference_alibi_dinov3_matches_an_eager_alibi_reference(tmp_path, prefix, gated):
    """The reference ALiBi-DINOv3 layout (Meta's dinov3 keys, `rope_embed` removed): constant-slope, wrapped,
    normalised Euclidean ALiBi, against the eager ViT with the bias from explicit loops, to 1e-5."""
    meta = to_meta_dinov3_keys(hf_dinov3(gated=gated), rope=False)
    path = save_meta(tmp_path, {prefix + key: value for key, value in meta.items()}, "alibi_coco_dv3_tiny_reg4.pth")
    with pytest.raises(CheckpointKeyError, match="--num_heads"):  # no RoPE periods: 64-dimensional heads assumed
        convert(path)
    model = convert(path, variant="keep-pe", num_heads=2)
    config = model.config
    assert config.model_type == "alibi_dinov3" and config.use_alibi and not config.use_rope
    assert (config.alibi_slopes, config.alibi_metric, config.alibi_wrap, config.alibi_normalize) == (
        "constant", "euclidean", True, True)
    assert config.num_attention_heads == 2 and config.num_register_tokens == 4 and config.use_gated_mlp == gated
    assert_matches(model, lambda x: reference_dinov3_forward(meta, x, 2, slopes=torch.ones(2, 2)))


def test_learned_dinov3_slopes_are_loaded(tmp_path):
    slopes = torch.tensor([[0.3, 1.7], [0.9, 0.1]])
    meta = to_meta_dinov3_keys(hf_dinov3(), rope=False)
    for layer, layer_slopes in enumerate(slopes):
        meta[f"blocks.{layer}.attn.m"] = layer_slopes.reshape(-1, 1, 1).clone()
    model = convert(save_meta(tmp_path, meta), variant="keep-pe", num_heads=2)
    assert model.config.alibi_slopes == "learned"
    torch.testing.assert_close(model.model.alibi.slopes.detach(), slopes)
    assert_matches(model, lambda x: reference_dinov3_forward(meta, x, 2, slopes=slopes), sizes=[(64, 48)])


def test_meta_dinov3_with_rope_keep_pe_is_stock_dinov3_and_alibi_drops_the_rope(tmp_path):
    source = hf_dinov3(gated=True)
    meta = to_meta_dinov3_keys(source)
    path = save_meta(tmp_path, meta)
    stock = convert(path, variant="keep-pe")
    assert stock.config.use_rope and not stock.config.use_alibi and stock.config.rope_theta == 100.0
    assert_matches(stock, lambda x: source(x).last_hidden_state)
    assert_matches(stock, lambda x: reference_dinov3_forward(meta, x, 2))
    alibi = convert(path)  # --variant alibi
    assert alibi.config.use_alibi and not alibi.config.use_rope
    without_rope = {key: value for key, value in meta.items() if key != "rope_embed.periods"}
    assert_matches(alibi, lambda x: reference_dinov3_forward(without_rope, x, 2, slopes=torch.ones(2, 2)))
    nope = convert(path, variant="nope")
    assert not nope.config.use_alibi and not nope.config.use_rope
    assert_matches(nope, lambda x: reference_dinov3_forward(without_rope, x, 2), sizes=[(64, 48)])
    with pytest.raises(InputError, match="--source_position learned does not apply"):
        convert(path, source_position="learned")


@pytest.mark.parametrize("gated", [False, True])
def test_transformers_dinov3_folder_converts(tmp_path, gated):
    source = hf_dinov3(gated=gated)
    source.save_pretrained(tmp_path / "source")
    stock = convert(str(tmp_path / "source"), variant="keep-pe")
    assert stock.config.use_rope and not stock.config.use_alibi and stock.config.use_gated_mlp == gated
    assert_matches(stock, lambda x: source(x).last_hidden_state)
    alibi = convert(str(tmp_path / "source"), tmp_path / "alibi")
    assert alibi.config.use_alibi and not alibi.config.use_rope
    theirs = source.state_dict()
    assert alibi.state_dict().keys() == theirs.keys()
    for name, tensor in alibi.state_dict().items():
        torch.testing.assert_close(tensor, theirs[name], atol=0, rtol=0)
    card = (tmp_path / "alibi" / "README.md").read_text()
    assert "# ALiBi-DINOv3 (ALiBi)" in card and "`DINOv3ViTModel`" in card and "| `use_rope` | `False` |" in card
    expected = "facebook/dinov3-vits16plus-pretrain-lvd1689m" if gated else "facebook/dinov3-vits16-pretrain-lvd1689m"
    config = type(alibi.config)(**dict(TINY_DINOV3, hidden_size=384, num_attention_heads=6, use_gated_mlp=gated))
    assert _comparison_model(config, str(tmp_path)) == expected


def test_keep_pe_keeps_both_rope_and_alibi_of_a_dinov3_source_with_both(tmp_path):
    source = convert(save_meta(tmp_path, to_meta_dinov3_keys(hf_dinov3())), variant="keep-pe")
    config = type(source.config)(**{**source.config.to_dict(), "use_alibi": True, "use_rope": True})
    both = type(source)(config).eval()
    both.load_state_dict(source.state_dict())
    both.save_pretrained(tmp_path / "both")
    converted = convert(str(tmp_path / "both"), variant="keep-pe")
    assert converted.config.use_alibi and converted.config.use_rope
    assert_matches(converted, lambda x: both(x).last_hidden_state)
