"""convert_checkpoint: every source layout reproduces its model, ALiBi folders round-trip, the card parses."""

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

import convert_checkpoint
from alibi_dinov2.conversion.convert import build_model, convert, save_model_folder
from alibi_dinov2.conversion.file_names import name_tokens, read_name_settings
from alibi_dinov2.conversion.model_card import _comparison_model, update_model_card_evaluation
from alibi_dinov2.conversion.sources import SourceCheckpoint
from alibi_dinov2.conversion.state_dicts import CheckpointKeyError, convert_vit_state_dict, detect_format, strip_prefix
from configuration_alibi_dinov2 import AlibiDinov2Config


PATCH = 14


def pixels(height, width, batch=2, seed=3):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def hf_model(tiny_kwargs, registers=4, swiglu=False, seed=0):
    torch.manual_seed(seed)
    if registers:
        config = Dinov2WithRegistersConfig(**tiny_kwargs, num_register_tokens=registers, use_swiglu_ffn=swiglu)
        model = Dinov2WithRegistersModel(config)
    else:
        model = Dinov2Model(Dinov2Config(**tiny_kwargs, use_swiglu_ffn=swiglu))
    # Non-trivial LayerScale so that a mix-up of ls1 / ls2 shows.
    for layer in model.encoder.layer:
        layer.layer_scale1.lambda1.data.uniform_(0.5, 1.5)
        layer.layer_scale2.lambda1.data.uniform_(0.5, 1.5)
    return model.eval()


def to_vit_keys(model, layout):
    """Write a transformers DINOv2 state dict in Meta's (`meta`) or timm's (`timm`) key layout."""
    source = model.state_dict()
    out = {
        "cls_token": source["embeddings.cls_token"],
        "patch_embed.proj.weight": source["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": source["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": source["layernorm.weight"],
        "norm.bias": source["layernorm.bias"],
    }
    position = source["embeddings.position_embeddings"]
    if layout == "meta":
        out["pos_embed"] = position
        out["mask_token"] = source["embeddings.mask_token"]
        if "embeddings.register_tokens" in source:
            out["register_tokens"] = source["embeddings.register_tokens"]
    else:
        out["pos_embed"] = position[:, 1:]  # timm's no_embed_class: no CLS position
        if "embeddings.register_tokens" in source:
            out["reg_token"] = source["embeddings.register_tokens"]
    for index in range(len(model.encoder.layer)):
        hf, vit = f"encoder.layer.{index}.", f"blocks.{index}."
        for name in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                out[f"{vit}{name}.{kind}"] = source[f"{hf}{name}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{vit}attn.qkv.{kind}"] = torch.cat([source[f"{hf}attention.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{vit}attn.proj.{kind}"] = source[f"{hf}attention.o_proj.{kind}"]
            if f"{hf}mlp.fc1.{kind}" in source:
                out[f"{vit}mlp.fc1.{kind}"] = source[f"{hf}mlp.fc1.{kind}"]
                out[f"{vit}mlp.fc2.{kind}"] = source[f"{hf}mlp.fc2.{kind}"]
            else:
                out[f"{vit}mlp.w12.{kind}"] = torch.cat(
                    [source[f"{hf}mlp.gate_proj.{kind}"], source[f"{hf}mlp.up_proj.{kind}"]]
                )
                out[f"{vit}mlp.w3.{kind}"] = source[f"{hf}mlp.down_proj.{kind}"]
        out[f"{vit}ls1.gamma"] = source[f"{hf}layer_scale1.lambda1"]
        out[f"{vit}ls2.gamma"] = source[f"{hf}layer_scale2.lambda1"]
    return {key: value.clone() for key, value in out.items()}


def loop_distance_matrix(height, width, num_prefix, wrap=True, normalize=True):
    """`(N, N)` Euclidean distances between patch positions by explicit loops (divided by the largest when
    `normalize`), 0 for prefix tokens."""
    num_tokens = num_prefix + height * width
    distance = torch.zeros(num_tokens, num_tokens)
    cells = [(y, x) for y in range(height) for x in range(width)]
    for i, (yi, xi) in enumerate(cells):
        for j, (yj, xj) in enumerate(cells):
            dy, dx = abs(yi - yj), abs(xi - xj)
            if wrap:
                dy, dx = min(dy, height - dy), min(dx, width - dx)
            distance[num_prefix + i, num_prefix + j] = math.sqrt(dy * dy + dx * dx)
    if normalize and distance.max() > 0:
        distance /= distance.max()
    return distance


def attention_residual(x, q, k, v, p, bias=None):
    """`x` plus the LayerScale'd (`ls1`) projection (`attn.proj`) of softmax(q k^T / sqrt(d) + bias) v, for
    `(B, heads, N, d)` q, k, v; `p(name)` gives the block's tensors."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return x + p("ls1.gamma") * (attended @ p("attn.proj.weight").T + p("attn.proj.bias"))


def reference_vit_forward(state_dict, pixel_values, num_heads, slopes=None, wrap=True, eps=1e-6, normalize=True):
    """An eager ViT written from a timm-layout state dict: position embedding on patch tokens only (timm's
    no_embed_class), CLS then registers, and with `slopes` (layers x heads) a 2D ALiBi bias from explicit loops."""
    weight = state_dict["patch_embed.proj.weight"]
    x = F.conv2d(pixel_values, weight, state_dict["patch_embed.proj.bias"], stride=weight.shape[-1])
    batch, channels, height, width = x.shape
    x = x.flatten(2).transpose(1, 2)
    if "pos_embed" in state_dict and state_dict["pos_embed"].count_nonzero() > 0:
        x = x + state_dict["pos_embed"]
    prefix = [state_dict["cls_token"].expand(batch, -1, -1)]
    if "reg_token" in state_dict:
        prefix.append(state_dict["reg_token"].expand(batch, -1, -1))
    x = torch.cat(prefix + [x], dim=1)
    num_prefix, num_tokens = x.shape[1] - height * width, x.shape[1]
    distance = loop_distance_matrix(height, width, num_prefix, wrap, normalize)
    head_dim = channels // num_heads
    layers = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    for layer in range(layers):
        p = lambda name: state_dict[f"blocks.{layer}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (channels,), p("norm1.weight"), p("norm1.bias"), eps)
        qkv = (y @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(batch, num_tokens, 3, num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = attention_residual(x, q, k, v, p, None if slopes is None else -slopes[layer].reshape(-1, 1, 1) * distance)
        y = F.layer_norm(x, (channels,), p("norm2.weight"), p("norm2.bias"), eps)
        hidden = F.gelu(y @ p("mlp.fc1.weight").T + p("mlp.fc1.bias"))
        x = x + p("ls2.gamma") * (hidden @ p("mlp.fc2.weight").T + p("mlp.fc2.bias"))
    return F.layer_norm(x, (channels,), state_dict["norm.weight"], state_dict["norm.bias"], eps)


# Full-size ViT-S/14 with 4 registers: the released reference and Meta checkpoints.
VITS14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)


def released_layout(hidden, layers, registers, layout, swiglu=False, grid=37, patch=PATCH):
    """Key -> shape of a released state dict, written from the published layouts (not from a model class): Meta's
    torch-hub `.pth` (`meta`: position embedding with the CLS position, mask token, `register_tokens`; SwiGLU `w12`
    / `w3` for ViT-g) or the reference timm `.pth` (`timm`: patch positions only, `reg_token`, no mask token)."""
    shapes = {
        "cls_token": (1, 1, hidden),
        "patch_embed.proj.weight": (hidden, 3, patch, patch),
        "patch_embed.proj.bias": (hidden,),
        "norm.weight": (hidden,),
        "norm.bias": (hidden,),
    }
    if layout == "meta":
        shapes.update({"pos_embed": (1, 1 + grid * grid, hidden), "mask_token": (1, hidden)})
        if registers:
            shapes["register_tokens"] = (1, registers, hidden)
    else:
        shapes["pos_embed"] = (1, grid * grid, hidden)
        if registers:
            shapes["reg_token"] = (1, registers, hidden)
    mlp = (int(4 * hidden * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * hidden  # ViT-g: 4096
    for index in range(layers):
        block = f"blocks.{index}."
        for name, shape in {
            "norm1.weight": (hidden,), "norm1.bias": (hidden,), "norm2.weight": (hidden,), "norm2.bias": (hidden,),
            "attn.qkv.weight": (3 * hidden, hidden), "attn.qkv.bias": (3 * hidden,),
            "attn.proj.weight": (hidden, hidden), "attn.proj.bias": (hidden,),
            "ls1.gamma": (hidden,), "ls2.gamma": (hidden,),
        }.items():
            shapes[block + name] = shape
        if swiglu:
            shapes.update({block + "mlp.w12.weight": (2 * mlp, hidden), block + "mlp.w12.bias": (2 * mlp,),
                           block + "mlp.w3.weight": (hidden, mlp), block + "mlp.w3.bias": (hidden,)})
        else:
            shapes.update({block + "mlp.fc1.weight": (mlp, hidden), block + "mlp.fc1.bias": (mlp,),
                           block + "mlp.fc2.weight": (hidden, mlp), block + "mlp.fc2.bias": (hidden,)})
    return shapes


def shapes_of(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def assert_same_outputs(converted, reference_fn, sizes):
    for size in sizes:
        pixel_values = pixels(*size)
        with torch.no_grad():
            torch.testing.assert_close(
                converted(pixel_values).last_hidden_state, reference_fn(pixel_values), atol=1e-5, rtol=0
            )


# --- transformers layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("registers", [4, 0])
def test_hf_keep_pe_reproduces_transformers(tmp_path, tiny_kwargs, registers):
    source = hf_model(tiny_kwargs, registers=registers)
    source.save_pretrained(tmp_path / "source")
    converted = convert(str(tmp_path / "source"), variant="keep-pe")
    assert converted.config.num_register_tokens == registers
    assert converted.config.interpolate_antialias == bool(registers)
    assert_same_outputs(converted, lambda x: source(x).last_hidden_state, [(56, 56), (70, 42)])


def test_alibi_conversion_drops_the_embedding_and_keeps_the_rest(tmp_path, tiny_kwargs):
    source = hf_model(tiny_kwargs)
    source.save_pretrained(tmp_path / "source")
    converted = convert(str(tmp_path / "source"), variant="alibi", alibi_slopes="geometric")
    assert converted.config.use_alibi and not converted.config.use_absolute_position_embeddings
    assert converted.config.alibi_slopes == "geometric"
    theirs = source.state_dict()
    for name, tensor in converted.state_dict().items():
        torch.testing.assert_close(tensor, theirs[name], atol=0, rtol=0)
    nope = convert(str(tmp_path / "source"), variant="nope")
    assert not nope.config.use_alibi and nope.encoder.alibi is None


@pytest.mark.slow
@pytest.mark.multiprocess
def test_alibi_folder_reloads_in_a_fresh_process(tmp_path, tiny_kwargs, run_isolated):
    source = hf_model(tiny_kwargs)
    source.save_pretrained(tmp_path / "source")
    output = tmp_path / "alibi"
    converted = convert(str(tmp_path / "source"), output, variant="alibi")
    pixel_values = pixels(42, 70)
    with torch.no_grad():
        torch.save({"x": pixel_values, "y": converted(pixel_values).last_hidden_state}, tmp_path / "io.pt")
    result = run_isolated(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        data = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(data["x"]).last_hidden_state, data["y"])
        print("identical", type(model).__module__.split(".")[0])
        """
    )
    assert "identical transformers_modules" in result.stdout


def test_feature_extraction_pipeline_runs_on_a_pil_image(tmp_path, tiny_kwargs):
    from transformers import pipeline

    source = hf_model(tiny_kwargs)
    source.save_pretrained(tmp_path / "source")
    output = tmp_path / "alibi"
    convert(str(tmp_path / "source"), output)
    extractor = pipeline("image-feature-extraction", model=str(output), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8))
    features = np.asarray(extractor(image))
    # DINOv2 preprocessing: shortest side 256, centre crop 224 -> a 16 x 16 grid, plus CLS and 4 registers.
    assert features.shape == (1, 1 + 4 + 16 * 16, 32)


def test_model_card_parses_back_with_its_metadata(tmp_path, tiny_kwargs):
    from huggingface_hub import ModelCard

    model = build_model(
        SourceCheckpoint(
            hf_model(tiny_kwargs).state_dict(),
            dict(tiny_kwargs, num_register_tokens=4),
            "hf",
            "learned",
            "facebook/dinov2-with-registers-small",
        ),
        "alibi",
    )
    output = save_model_folder(
        model,
        tmp_path / "out",
        base_model="facebook/dinov2-with-registers-small",
        hyperparameters={"learning_rate": 1e-4},
    )
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.base_model == "facebook/dinov2-with-registers-small"
    assert card.data.license == "apache-2.0"
    assert "arxiv:2603.16840" in card.data.tags
    assert "trust_remote_code=True" in card.text and "do_center_crop=False" in card.text
    assert "| `learning_rate` | `0.0001` |" in card.text
    assert "python -m demo.app --models facebook/dinov2-with-registers-small path/to/this/folder" in card.text
    assert "not evaluated yet" in card.text
    update_model_card_evaluation(output, {"lr+ud R^2 (micro)": -0.2312, "patch cosine": 0.9})
    card = ModelCard.load(output / "README.md")
    assert "| lr+ud R^2 (micro) | -0.2312 |" in card.text and "not evaluated yet" not in card.text
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert (output / "preprocessor_config.json").exists()


@pytest.mark.parametrize(
    "hidden_size, registers, expected",
    [(768, 0, "facebook/dinov2-base"), (1024, 4, "facebook/dinov2-with-registers-large")],
)
def test_demo_compares_with_the_stock_hub_model_of_the_same_layout(tmp_path, hidden_size, registers, expected):
    config = AlibiDinov2Config(
        hidden_size=hidden_size, num_attention_heads=hidden_size // 64, num_register_tokens=registers
    )
    assert _comparison_model(config, str(tmp_path)) == expected  # converted from a local file
    assert _comparison_model(config, "someone/dinov2-finetuned") == "someone/dinov2-finetuned"


# --- Meta torch-hub layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("registers, swiglu", [(4, False), (0, False), (4, True)])
def test_meta_keep_pe_reproduces_the_model(tmp_path, tiny_kwargs, registers, swiglu):
    source = hf_model(tiny_kwargs, registers=registers, swiglu=swiglu)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(to_vit_keys(source, "meta"), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert detect_format(path) == "meta"
    converted = convert(path, variant="keep-pe", num_heads=2)
    assert converted.config.use_swiglu_ffn == swiglu and converted.config.image_size == 56
    assert_same_outputs(converted, lambda x: source(x).last_hidden_state, [(56, 56), (70, 42)])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the source file is untouched


def test_meta_head_count_defaults_to_64_dimensional_heads(tmp_path):
    torch.manual_seed(0)
    source = hf_model(dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, patch_size=14, image_size=28))
    path = tmp_path / "meta.pth"
    torch.save(to_vit_keys(source, "meta"), path)
    converted = convert(path, variant="keep-pe")
    assert converted.config.num_attention_heads == 2 and converted.config.num_hidden_layers == 1
    assert_same_outputs(converted, lambda x: source(x).last_hidden_state, [(28, 28)])


def test_unexpected_and_missing_keys_are_listed(tmp_path, tiny_kwargs):
    state_dict = to_vit_keys(hf_model(tiny_kwargs), "meta")
    with_head = dict(state_dict, **{"head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3)})
    torch.save(with_head, tmp_path / "extra.pth")
    with pytest.raises(CheckpointKeyError, match="unexpected key.*head.bias, head.weight"):
        convert(tmp_path / "extra.pth", num_heads=2)
    del state_dict["blocks.1.ls2.gamma"]
    torch.save(state_dict, tmp_path / "missing.pth")
    with pytest.raises(CheckpointKeyError, match=r"Missing: encoder\.layer\.1\.layer_scale2\.lambda1"):
        convert(tmp_path / "missing.pth", num_heads=2)


def test_pickled_code_is_refused(tmp_path):
    torch.save({"cls_token": torch.zeros(1), "recipe": Image.new("L", (1, 1))}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights-only"):
        convert(tmp_path / "unsafe.pth")


# --- timm layout (reference ALiBi / NoPE checkpoints) -------------------------------------------------------------


def timm_checkpoint(tiny_kwargs, positional="alibi", slopes=None, prefix=""):
    state_dict = to_vit_keys(hf_model(tiny_kwargs), "timm")
    if positional != "learned":
        state_dict["pos_embed"] = torch.zeros_like(state_dict["pos_embed"])
    if slopes is not None:
        for layer, layer_slopes in enumerate(slopes):
            state_dict[f"blocks.{layer}.attn.m"] = layer_slopes.reshape(-1, 1, 1).clone()
    return {prefix + key: value for key, value in state_dict.items()}


@pytest.mark.parametrize("prefix", ["", "model.", "vit."])
def test_timm_alibi_keep_pe_matches_an_eager_alibi_reference(tmp_path, tiny_kwargs, prefix):
    state_dict = timm_checkpoint(tiny_kwargs, prefix=prefix)
    path = tmp_path / "alibi_dv2_tiny_reg4.pth"
    torch.save(state_dict, path)
    assert detect_format(path) == "timm"
    converted = convert(path, variant="keep-pe", num_heads=2)
    assert converted.config.use_alibi and converted.config.alibi_slopes == "constant"
    bare = strip_prefix(state_dict)
    constant = torch.ones(2, 2)
    assert_same_outputs(converted, lambda x: reference_vit_forward(bare, x, 2, constant), [(56, 56), (42, 70)])


def test_timm_learned_slopes_are_loaded(tmp_path, tiny_kwargs):
    slopes = torch.tensor([[0.3, 1.7], [0.9, 0.1]])
    state_dict = timm_checkpoint(tiny_kwargs, slopes=slopes)
    torch.save(state_dict, tmp_path / "alibi_learned.pth")
    converted = convert(tmp_path / "alibi_learned.pth", variant="keep-pe", num_heads=2)
    assert converted.config.alibi_slopes == "learned"
    torch.testing.assert_close(converted.encoder.alibi.slopes.detach(), slopes)
    assert_same_outputs(converted, lambda x: reference_vit_forward(state_dict, x, 2, slopes), [(42, 56)])


def test_timm_nope_and_learned_embedding_checkpoints(tmp_path, tiny_kwargs):
    nope = timm_checkpoint(tiny_kwargs)
    torch.save(nope, tmp_path / "nope_coco_dv2_tiny_reg4.pth")
    converted = convert(tmp_path / "nope_coco_dv2_tiny_reg4.pth", variant="keep-pe", num_heads=2)
    assert not converted.config.use_alibi and not converted.config.use_absolute_position_embeddings
    assert_same_outputs(converted, lambda x: reference_vit_forward(nope, x, 2), [(42, 70)])

    learned = timm_checkpoint(tiny_kwargs, positional="learned")
    torch.save(learned, tmp_path / "timm_pe.pth")
    converted = convert(tmp_path / "timm_pe.pth", variant="keep-pe", num_heads=2)
    assert converted.config.use_absolute_position_embeddings
    assert_same_outputs(converted, lambda x: reference_vit_forward(learned, x, 2), [(56, 56)])


@pytest.mark.parametrize(
    "name, wrap, normalize",
    [("alibi_dv2_no_norm_no_wrap_nocb.pth", False, False), ("alibi_dv3_plus_no_norm_wrap_cb_ms.pth", True, False),
     ("alibi_dv2_vits14-noWrap.pth", False, True)],
)
def test_reference_ablation_settings_are_read_from_the_file_name(tmp_path, tiny_kwargs, caplog, name, wrap,
                                                                 normalize):
    """The reference's ablation files record `no_norm` / `no_wrap` in their names only: the converted model takes
    them (one note says so) and reproduces an eager ALiBi with those distances."""
    state_dict = timm_checkpoint(tiny_kwargs)
    torch.save(state_dict, tmp_path / name)
    with caplog.at_level("WARNING", logger="alibi_dinov2.conversion"):
        converted = convert(tmp_path / name, variant="keep-pe", num_heads=2)
    assert (converted.config.alibi_wrap, converted.config.alibi_normalize) == (wrap, normalize)
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 1 and notes[0].startswith(f"{name}: read from the name: ") and "alibi_wrap" in notes[0]
    constant = torch.ones(2, 2)
    reference = lambda x: reference_vit_forward(state_dict, x, 2, constant, wrap=wrap, normalize=normalize)  # noqa: E731
    assert_same_outputs(converted, reference, [(42, 70)])
    # An explicit option still wins over the name.
    assert convert(tmp_path / name, num_heads=2, alibi_wrap=True).config.alibi_wrap


def test_name_words_that_are_not_applied_or_not_known_are_warned_once(tmp_path, tiny_kwargs, caplog):
    timm = timm_checkpoint(tiny_kwargs)
    learned_pe = timm_checkpoint(tiny_kwargs, positional="learned")
    cases = {
        # an unknown negated word: converted with the defaults, and said so
        "alibi_dv2_no_cls_reg4.pth": (timm, "'no_cls' looks like a setting but is not read"),
        # ALiBi words on a file with a learned embedding and no ALiBi
        "dinov2_no_wrap.pth": (learned_pe, "not applied: 'no_wrap' (the source is read as a learned model"),
        # 'learned' slopes named, none stored
        "alibi_learned_dv2.pth": (timm, "not applied: 'learned'"),
    }
    for name, (state_dict, expected) in cases.items():
        torch.save(state_dict, tmp_path / name)
        caplog.clear()
        with caplog.at_level("WARNING", logger="alibi_dinov2.conversion"):
            model = convert(tmp_path / name, variant="keep-pe", num_heads=2)
        notes = [record.getMessage() for record in caplog.records]
        assert len(notes) == 1 and expected in notes[0], notes
        assert model.config.alibi_wrap and model.config.alibi_normalize  # the defaults, untouched
    # Words that describe training only (COCO, channel blanking, multi-scale) and the released names say nothing.
    for name in ("alibi_coco_dv2_vits14_reg4.pth", "dinov2_vits14_reg4_pretrain.pth", "alibi_dv2_nocb_no_ms.pth"):
        torch.save(timm, tmp_path / name)
        caplog.clear()
        with caplog.at_level("WARNING", logger="alibi_dinov2.conversion"):
            convert(tmp_path / name, num_heads=2)
        assert not caplog.records, name


def test_name_tokens_join_negations_and_later_words_win():
    assert name_tokens("hf://o/r/Alibi_DV2_no-norm_noWrap_nocb.pth") == ["alibi", "dv2", "no_norm", "no_wrap", "no_cb"]
    assert name_tokens("https://h/x/nope_coco_dv2_vits14_reg4.pth?download=1") == [
        "nope", "coco", "dv2", "vits14", "reg4"]
    settings = read_name_settings("alibi_no_wrap_wrap_no_norm_no_bias_nope.pth")
    assert settings.alibi_options == {"alibi_wrap": True, "alibi_normalize": False}
    assert settings.scheme_tokens == ("nope",) and settings.unknown == ("no_bias",)


# --- the released layouts at full size ----------------------------------------------------------------------------


def test_full_size_builders_write_the_released_vits14_reg4_key_sets():
    """The state dicts the parity tests convert have exactly the keys and shapes of `alibi_*_dv2_vits14_reg4.pth`
    (175 keys) and of Meta's `dinov2_vits14_reg4_pretrain.pth` (176 keys)."""
    model = hf_model(VITS14)
    timm, meta = to_vit_keys(model, "timm"), to_vit_keys(model, "meta")
    assert len(timm) == 175 and shapes_of(timm) == released_layout(384, 12, 4, "timm")
    assert len(meta) == 176 and shapes_of(meta) == released_layout(384, 12, 4, "meta")


@pytest.mark.parametrize("registers", [4, 0])
@pytest.mark.parametrize(
    "hidden, layers, swiglu", [(384, 12, False), (768, 12, False), (1024, 24, False), (1536, 40, True)], ids="SBLg"
)
def test_every_meta_dinov2_size_converts_with_its_released_shapes(hidden, layers, swiglu, registers):
    """Every Meta DINOv2 size, with and without registers, at full size on the meta device (no memory, no numbers:
    names and shapes; the tiny SwiGLU parity test above checks the numbers of the giant's MLP)."""
    shapes = released_layout(hidden, layers, registers, "meta", swiglu)
    if swiglu:
        assert shapes["blocks.39.mlp.w3.weight"] == (1536, 4096) and len(shapes) == 7 + bool(registers) + 40 * 14
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, patch_size=14,
                  image_size=518)
    with torch.device("meta"):
        assert shapes_of(to_vit_keys(hf_model(kwargs, registers=registers, swiglu=swiglu), "meta")) == shapes
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    converted, architecture = convert_vit_state_dict(state_dict, "meta")
    assert architecture["num_attention_heads"] == hidden // 64 and architecture["num_hidden_layers"] == layers
    assert architecture["image_size"] == 518 and architecture["num_register_tokens"] == registers
    assert architecture["use_swiglu_ffn"] == swiglu
    checkpoint = SourceCheckpoint(converted, architecture, "meta", "learned", "meta.pth")
    with torch.device("meta"):
        model = build_model(checkpoint, "keep-pe")  # strict: every key found its parameter
    assert sum(p.numel() for p in model.state_dict().values()) == sum(math.prod(shape) for shape in shapes.values())


def test_a_dinov3_checkpoint_is_told_from_the_dinov2_layouts():
    state_dict = {"cls_token": torch.zeros(1, 1, 8), "storage_tokens": torch.zeros(1, 4, 8),
                  "rope_embed.periods": torch.zeros(2), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    assert detect_format("alibi_coco_dv3_vits16_plus_reg4.pth", state_dict) == "dinov3"
    # The reference ALiBi-DINOv3 without registers or RoPE: a mask token but no position embedding.
    bare = {
        "cls_token": torch.zeros(1, 1, 8),
        "mask_token": torch.zeros(1, 8),
        "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
    }
    assert detect_format("alibi.pth", bare) == "dinov3"
    assert detect_format("meta.pth", dict(bare, pos_embed=torch.zeros(1, 5, 8))) == "meta"
    with pytest.raises(ValueError, match="not a DINOv2 or DINOv3 ViT state dict"):
        detect_format("other.pth", {"cls_token": torch.zeros(1, 1, 8)})


# --- command line -------------------------------------------------------------------------------------------------


def test_command_line_sets_alibi_options(tmp_path, tiny_kwargs):
    hf_model(tiny_kwargs).save_pretrained(tmp_path / "source")
    model = convert_checkpoint.main(
        [
            str(tmp_path / "source"),
            str(tmp_path / "out"),
            "--alibi-metric",
            "manhattan",
            "--alibi-wrap",
            "false",
            "--alibi-slopes",
            "learned",
        ]
    )
    assert (model.config.alibi_metric, model.config.alibi_wrap, model.config.alibi_slopes) == (
        "manhattan",
        False,
        "learned",
    )
    torch.testing.assert_close(model.encoder.alibi.slopes.detach(), torch.ones(2, 2))
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_unknown_variant_is_a_clear_error(tmp_path, tiny_kwargs):
    hf_model(tiny_kwargs).save_pretrained(tmp_path / "source")
    with pytest.raises(ValueError, match="`variant` must be one of 'alibi', 'nope', 'keep-pe'"):
        convert(str(tmp_path / "source"), variant="rope")
    with pytest.raises(SystemExit):
        convert_checkpoint.parse_args([str(tmp_path / "source"), "out", "--variant", "rope"])


def test_keep_pe_keeps_both_the_alibi_and_the_learned_embedding_of_a_source_with_both(tmp_path, tiny_kwargs):
    from modeling_alibi_dinov2 import AlibiDinov2Model

    torch.manual_seed(0)
    config = AlibiDinov2Config(**tiny_kwargs, use_alibi=True, use_absolute_position_embeddings=True)
    source = AlibiDinov2Model(config).eval()
    with torch.no_grad():
        source.embeddings.position_embeddings.normal_(0, 1.0)
    source.save_pretrained(tmp_path / "both")
    converted = convert(str(tmp_path / "both"), variant="keep-pe")
    assert converted.config.use_alibi and converted.config.use_absolute_position_embeddings
    torch.testing.assert_close(converted.embeddings.position_embeddings, source.embeddings.position_embeddings)
    assert_same_outputs(converted, lambda x: source(x).last_hidden_state, [(56, 56), (42, 70)])
    alibi = convert(str(tmp_path / "both"), variant="alibi")
    assert alibi.config.use_alibi and not alibi.config.use_absolute_position_embeddings
