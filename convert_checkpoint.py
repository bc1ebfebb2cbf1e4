"""Retrofit a DINOv2 or DINOv3 checkpoint into a ready-to-publish ALiBi-DINOv2 / ALiBi-DINOv3 folder.

Sources (detected from the path and its keys; `--source_format` overrides):

- `hf`: a transformers `Dinov2Model` / `Dinov2WithRegistersModel` / `DINOv3ViTModel` (Hub id such as
  `facebook/dinov2-small` or `facebook/dinov3-vits16plus-pretrain-lvd1689m`, or a local folder), or a folder saved
  by this project;
- `meta`: a Meta torch-hub DINOv2 state dict (`dinov2_vits14_pretrain.pth`, `dinov2_vits14_reg4_pretrain.pth`, ...);
- `timm`: a timm VisionTransformer state dict, such as the reference ALiBi / NoPE checkpoints (keys bare or
  prefixed by `model.` or `vit.`; learned ALiBi slopes `blocks.N.attn.m` are loaded when present);
- `dinov3`: a state dict in Meta's dinov3 layout (`storage_tokens`, `rope_embed.periods`, masked key bias), or the
  reference ALiBi-DINOv3 checkpoint, the same layout without `rope_embed.periods` (keys bare or prefixed by
  `model.` or `backbone.`).

A `.pth` may be named by URL (see `alibi_dinov2.hub.remote_files`): `hf://OWNER/REPO/FILE` or a Hub file URL
(`https://huggingface.co/OWNER/REPO/resolve/REV/FILE`, `.../blob/REV/FILE`), fetched into the Hub cache at `--revision`,
or a plain `https://` URL, downloaded once into torch.hub's cache and checked against `--sha256` when given. Offline
(`HF_HUB_OFFLINE=1`) only cached files are read.

Variants: `alibi` (learned position embedding or RoPE dropped, ALiBi on), `nope` (neither), `keep-pe` (the source's
own position scheme, reproducing its outputs: for parity checks).

    python convert_checkpoint.py facebook/dinov2-with-registers-small out/alibi-dinov2-small
    python convert_checkpoint.py dinov2_vits14_reg4_pretrain.pth out/nope --variant nope
    python convert_checkpoint.py alibi_dv2_vits14_reg4.pth out/alibi --push_to_hub me/alibi-dinov2-small
    python convert_checkpoint.py hf://rmdocherty/dino-saw/alibi_coco_dv2_vits14_reg4.pth out/alibi-coco
    python convert_checkpoint.py facebook/dinov3-vits16plus-pretrain-lvd1689m out/alibi-dinov3-small-plus
    python convert_checkpoint.py hf://rmdocherty/dino-saw/alibi_coco_dv3_vits16_plus_reg4.pth out/alibi-dinov3-coco

`.pth` files are read with `torch.load(..., weights_only=True)` only and never modified.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from configuration_alibi_dinov2 import AlibiDinov2Config
from configuration_alibi_dinov3 import AlibiDinov3Config
from alibi_dinov2.cli import ArgumentParser, run_command
from alibi_dinov2.errors import InputError
from alibi_dinov2.hub.sources import check_model_source
from alibi_dinov2.io.files import write_text_atomic
from alibi_dinov2.features.preprocessing import dinov2_image_processor
from alibi_dinov2.hub.remote_files import fetch_file, is_remote_file
from alibi_dinov2.hub.push import push_to_hub as push_folder
from modeling_alibi_dinov2 import AlibiDinov2Model
from modeling_alibi_dinov3 import AlibiDinov3Model


DEFAULT_SOURCE = "facebook/dinov2-with-registers-small"
SOURCE_FORMATS = ("auto", "hf", "meta", "timm", "dinov3")
VARIANTS = ("alibi", "nope", "keep-pe")
# How a checkpoint encodes positions: a learned absolute embedding (DINOv2) or RoPE (DINOv3), the ALiBi bias, both
# ("learned+alibi", "rope+alibi"), or nothing. `--source_position` names one of the single ones.
POSITION_SCHEMES = ("auto", "learned", "rope", "alibi", "nope")
PAPER_ARXIV_ID = "2603.16840"
# Every DINOv2 size and all DINOv3 sizes but ViT-7B use 64-dimensional heads; Meta and timm state dicts do not store
# the head count (a dinov3 state dict with RoPE does: `rope_embed.periods` holds head_dim / 4 periods).
DINOV2_HEAD_DIM = 64
KEY_PREFIXES = ("model.", "vit.", "backbone.")
EVALUATION_START, EVALUATION_END = "<!-- evaluation-table:start -->", "<!-- evaluation-table:end -->"
# What a card calls the model until it knows its Hub repository.
FOLDER_PLACEHOLDER = "path/to/this/folder"


@dataclass
class SourceCheckpoint:
    """A checkpoint read into this project's parameter names.

    `family` is "dinov2" or "dinov3"; `state_dict` uses the keys of that family's model (`AlibiDinov2Model`, or
    `AlibiDinov3Model`, whose keys are transformers' `DINOv3ViTModel`'s); `architecture` holds the configuration
    fields it implies; `position_scheme` is how the source encodes positions ("learned", "rope", "alibi",
    "learned+alibi", "rope+alibi" or "nope"); `alibi_options` the ALiBi settings of an ALiBi source.
    """

    state_dict: dict
    architecture: dict
    source_format: str
    position_scheme: str
    name: str
    alibi_options: dict = field(default_factory=dict)
    family: str = "dinov2"


class CheckpointKeyError(ValueError):
    """A state dict whose keys do not fit the expected layout."""


# --- reading sources -----------------------------------------------------------------------------------------------


def _is_checkpoint_file(source) -> bool:
    return Path(str(source)).suffix in (".pth", ".pt", ".bin", ".safetensors") and Path(str(source)).is_file()


def read_state_dict_file(path) -> dict:
    """Tensors of a `.pth` / `.pt` / `.bin` (loaded with `weights_only=True`) or `.safetensors` file; a state dict
    wrapped in a dict under `model`, `state_dict`, `teacher` or `student` is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle with code, a truncated file, not a checkpoint at all
            raise ValueError(
                f"Cannot read {path} as a weights-only PyTorch checkpoint ({type(error).__name__}: {error}). "
                "Only plain state dicts of tensors are accepted."
            ) from error
    for wrapper in ("model", "state_dict", "teacher", "student"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    return state_dict


def strip_prefix(state_dict: dict, prefixes=KEY_PREFIXES) -> dict:
    """Drop the `model.`, `vit.` or `backbone.` prefixes carried by every key (`model.backbone.` too)."""
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict


# Keys only Meta's dinov3 layout has; a dinov3 state dict without any of them (an ALiBi file with no registers and a
# plain MLP) still differs from a DINOv2 one by its mask token without a position embedding.
DINOV3_ONLY_KEYS = {"storage_tokens", "rope_embed.periods", "blocks.0.attn.qkv.bias_mask", "blocks.0.mlp.w1.weight"}


def detect_format(source, state_dict: dict | None = None) -> str:
    """`hf` for a Hub id or a transformers folder; `meta`, `timm` or `dinov3` for a state-dict file, told apart by
    its keys (timm calls the registers `reg_token` and has no mask token; dinov3 calls them `storage_tokens` and has
    no learned position embedding)."""
    if state_dict is None and not _is_checkpoint_file(source):
        return "hf"
    keys = set(strip_prefix(state_dict if state_dict is not None else read_state_dict_file(source)))
    if "blocks.0.attn.qkv.weight" not in keys:
        raise ValueError(f"{source} is not a DINOv2 or DINOv3 ViT state dict (no `blocks.0.attn.qkv.weight`).")
    if DINOV3_ONLY_KEYS & keys or ("mask_token" in keys and "pos_embed" not in keys):
        return "dinov3"
    if "reg_token" in keys or "mask_token" not in keys:
        return "timm"
    return "meta"


def _block_count(keys) -> int:
    indices = {int(match.group(1)) for key in keys if (match := re.match(r"blocks\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _vit_architecture(state_dict: dict, num_heads: int | None) -> dict:
    hidden_size, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    if swiglu:
        mlp_hidden = state_dict["blocks.0.mlp.w3.weight"].shape[1]
    else:
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=_block_count(state_dict),
        num_attention_heads=num_heads or hidden_size // DINOV2_HEAD_DIM,
        mlp_ratio=4 if swiglu else mlp_hidden // hidden_size,
        patch_size=patch_size,
        use_swiglu_ffn=swiglu,
        layer_norm_eps=1e-6,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
    )


def _finish_mapping(converted: dict, unexpected: list, slopes: dict, layout: str, slopes_key: str) -> None:
    """End of a key mapping: unmapped source keys raise `CheckpointKeyError` naming them; per-block ALiBi slopes
    `{block: (heads,)}` become one `(layers, heads)` tensor at `slopes_key`."""
    if unexpected:
        raise CheckpointKeyError(
            f"{len(unexpected)} unexpected key(s) in the {layout} state dict: {', '.join(sorted(unexpected))}"
        )
    if slopes:
        converted[slopes_key] = torch.stack([slopes[i] for i in range(len(slopes))])


def convert_vit_state_dict(state_dict: dict, source_format: str, num_heads: int | None = None) -> tuple[dict, dict]:
    """Map a Meta or timm ViT state dict onto `AlibiDinov2Model` keys.

    Returns:
        `(state_dict, architecture)`; unmapped source keys raise `CheckpointKeyError` naming them.
    """
    state_dict = strip_prefix(dict(state_dict)) if source_format == "timm" else dict(state_dict)
    architecture = _vit_architecture(state_dict, num_heads)
    hidden_size, patch_size = architecture["hidden_size"], architecture["patch_size"]
    converted, unexpected = {}, []
    slopes = {}

    def put(name, tensor):
        converted[name] = tensor.clone()

    for key, tensor in state_dict.items():
        block = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if key == "cls_token":
            put("embeddings.cls_token", tensor)
        elif key == "mask_token":
            put("embeddings.mask_token", tensor.reshape(1, hidden_size))
        elif key in ("register_tokens", "reg_token"):
            put("embeddings.register_tokens", tensor)
        elif key == "pos_embed":
            if source_format == "timm":
                # timm's no-class-token layout: prepend a zero CLS position (timm adds none to the CLS token).
                tensor = torch.cat((tensor.new_zeros(1, 1, hidden_size), tensor), dim=1)
            architecture["image_size"] = math.isqrt(tensor.shape[1] - 1) * patch_size
            put("embeddings.position_embeddings", tensor)
        elif key.startswith("patch_embed.proj."):
            put("embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1], tensor)
        elif key.startswith("norm."):
            put("layernorm." + key.rsplit(".", 1)[1], tensor)
        elif block:
            index, rest = block.groups()
            prefix = f"encoder.layer.{index}."
            if rest.startswith(("norm1.", "norm2.")):
                put(prefix + rest, tensor)
            elif rest.startswith("attn.qkv."):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    put(f"{prefix}attention.{name}.{rest.rsplit('.', 1)[1]}", part)
            elif rest.startswith("attn.proj."):
                put(f"{prefix}attention.o_proj.{rest.rsplit('.', 1)[1]}", tensor)
            elif rest == "attn.m":
                slopes[int(index)] = tensor.reshape(-1)
            elif rest in ("ls1.gamma", "ls2.gamma"):
                put(f"{prefix}layer_scale{rest[2]}.lambda1", tensor)
            elif rest.startswith(("mlp.fc1.", "mlp.fc2.")) and not architecture["use_swiglu_ffn"]:
                put(prefix + rest, tensor)
            elif rest.startswith("mlp.w12."):
                # Meta's fused SwiGLU: the first half gates (through SiLU), the second half is the value.
                gate, up = tensor.chunk(2, dim=0)
                put(f"{prefix}mlp.gate_proj.{rest.rsplit('.', 1)[1]}", gate)
                put(f"{prefix}mlp.up_proj.{rest.rsplit('.', 1)[1]}", up)
            elif rest.startswith("mlp.w3."):
                put(f"{prefix}mlp.down_proj.{rest.rsplit('.', 1)[1]}", tensor)
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    _finish_mapping(converted, unexpected, slopes, source_format, "encoder.alibi.slopes")
    # timm checkpoints carry no mask token (used only by masked pre-training): start it at zero, as DINOv2 does.
    converted.setdefault("embeddings.mask_token", torch.zeros(1, hidden_size))
    architecture["num_register_tokens"] = (
        converted["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in converted else 0
    )
    return converted, architecture


# Meta dinov3 names -> transformers `DINOv3ViTModel` names, for tensors copied as they are.
DINOV3_RENAMES = (
    (r"cls_token", r"embeddings.cls_token"),
    (r"storage_tokens", r"embeddings.register_tokens"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"blocks\.(\d+)\.(norm[12])\.(weight|bias)", r"model.layer.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"model.layer.\1.attention.o_proj.\2"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    # SwiGLU: down(silu(w1 x) * w2 x)
    (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"model.layer.\1.mlp.gate_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
)
DINOV3_LAYER_NORM_EPS = 1e-5
DINOV3_ROPE_THETA = 100.0


def rope_theta_of_periods(periods: torch.Tensor, head_dim: int) -> float:
    """The RoPE base behind Meta's `rope_embed.periods` (`theta ** (4 i / head_dim)` for i < head_dim / 4), the one
    form transformers' DINOv3 computes; periods of another form (Meta's min / max periods) raise
    `CheckpointKeyError`."""
    if periods.numel() * 4 != head_dim:
        raise CheckpointKeyError(
            f"`rope_embed.periods` holds {periods.numel()} periods, but {head_dim}-dimensional heads need "
            f"{head_dim // 4}: give the right --num_heads (hidden size / head size)."
        )
    exponents = torch.arange(periods.numel(), dtype=torch.float64) * 4 / head_dim
    if periods.numel() < 2:
        return DINOV3_ROPE_THETA
    log_periods = periods.double().log()
    theta = float(torch.exp((exponents * log_periods).sum() / exponents.pow(2).sum()))
    if not torch.allclose(log_periods, exponents * math.log(theta), atol=1e-4, rtol=0):
        raise CheckpointKeyError(
            "`rope_embed.periods` are not theta ** (4 i / head_dim) (periods set by a minimum and maximum?): "
            "transformers' DINOv3 computes RoPE from a base `rope_theta` only, so this RoPE cannot be kept; "
            "convert with --source_position alibi (or nope) to leave it out."
        )
    return float(f"{theta:.6g}")


def _key_bias_masked(bias_mask: torch.Tensor, name: str) -> bool:
    """Whether Meta's `bias_mask` (1 on the query and value thirds) zeroes the key third of the qkv bias."""
    query, key, value = bias_mask.chunk(3)
    if not (bool((query == 1).all()) and bool((value == 1).all()) and set(key.unique().tolist()) in ({0.0}, {1.0})):
        raise CheckpointKeyError(
            f"`{name}` must hold 1 on its query and value thirds and one value, 0 (masked) or 1, on its key third: "
            "the checkpoint is not in Meta's dinov3 layout."
        )
    return bool((key == 0).all())


def _dinov3_architecture(state_dict: dict, num_heads: int | None, read_rope: bool = True) -> dict:
    """`DINOv3ViTConfig` fields implied by a Meta dinov3 state dict (heads: hidden / head_dim, head_dim from the
    RoPE periods, else 64, unless `num_heads` is given; `rope_theta` from the periods when `read_rope`)."""
    hidden_size, num_channels, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    gated = "blocks.0.mlp.w1.weight" in state_dict
    periods = state_dict.get("rope_embed.periods")
    head_dim = 4 * periods.numel() if periods is not None and num_heads is None else DINOV2_HEAD_DIM
    num_heads = num_heads or hidden_size // head_dim
    if num_heads == 0 or hidden_size % num_heads:
        raise CheckpointKeyError(
            f"Width {hidden_size} does not split into {head_dim}-dimensional heads: give the head count with "
            "--num_heads (the state dict has no RoPE periods to read the head size from)."
        )
    masks = [tensor for key, tensor in state_dict.items() if key.endswith(".attn.qkv.bias_mask")]
    masked = {_key_bias_masked(mask, "attn.qkv.bias_mask") for mask in masks}
    if len(masked) > 1:
        raise CheckpointKeyError("Some blocks mask the key bias and others do not: one `key_bias` cannot describe both.")
    qkv_bias = "blocks.0.attn.qkv.bias" in state_dict
    architecture = dict(
        hidden_size=hidden_size,
        intermediate_size=state_dict[f"blocks.0.mlp.{'w1' if gated else 'fc1'}.weight"].shape[0],
        num_hidden_layers=_block_count(state_dict),
        num_attention_heads=num_heads,
        hidden_act="silu" if gated else "gelu",
        layer_norm_eps=DINOV3_LAYER_NORM_EPS,
        patch_size=patch_size,
        num_channels=num_channels,
        query_bias=qkv_bias,
        key_bias=qkv_bias and masked != {True},
        value_bias=qkv_bias,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        mlp_bias=f"blocks.0.mlp.{'w1' if gated else 'fc1'}.bias" in state_dict,
        use_gated_mlp=gated,
        num_register_tokens=state_dict["storage_tokens"].shape[1] if "storage_tokens" in state_dict else 0,
    )
    if periods is not None and read_rope:
        architecture["rope_theta"] = rope_theta_of_periods(periods, hidden_size // num_heads)
    return architecture


def _dinov3_attention_entries(index: str, rest: str, tensor: torch.Tensor, key_bias: bool) -> dict:
    """`DINOv3ViTModel` tensors of one Meta `blocks.N.attn.qkv.*` tensor: q, k, v split (the key bias only when it
    is not masked); the mask itself is used up by the architecture (`key_bias`)."""
    prefix = f"model.layer.{index}.attention."
    if rest == "attn.qkv.bias_mask":
        return {}
    kind = rest.rsplit(".", 1)[1]
    parts = dict(zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)))
    if kind == "bias" and not key_bias:
        del parts["k_proj"]  # masked to zero in Meta's model
    return {f"{prefix}{name}.{kind}": part for name, part in parts.items()}


def convert_dinov3_state_dict(state_dict: dict, num_heads: int | None = None, read_rope: bool = True) -> tuple[dict, dict]:
    """Map a state dict in Meta's dinov3 layout (bare or prefixed keys) onto `DINOv3ViTModel` keys, the keys of
    `AlibiDinov3Model`; learned ALiBi slopes `blocks.N.attn.m` become `model.alibi.slopes`.

    Returns:
        `(state_dict, architecture)`; `architecture["rope_theta"]` only when the source has RoPE periods and
        `read_rope` (False: the RoPE is left out unread). Unmapped source keys raise `CheckpointKeyError` naming them.
    """
    state_dict = strip_prefix(dict(state_dict))
    architecture = _dinov3_architecture(state_dict, num_heads, read_rope)
    hidden_size = architecture["hidden_size"]
    converted, unexpected, slopes = {}, [], {}
    for key, tensor in state_dict.items():
        block = re.match(r"blocks\.(\d+)\.(attn\.qkv\.(?:weight|bias|bias_mask)|attn\.m)$", key)
        renamed = next((re.sub(f"^{a}$", b, key) for a, b in DINOV3_RENAMES if re.fullmatch(a, key)), None)
        if renamed is not None:
            converted[renamed] = tensor.clone()
        elif key == "mask_token":
            converted["embeddings.mask_token"] = tensor.reshape(1, 1, hidden_size).clone()
        elif key == "rope_embed.periods":
            pass  # recomputed from `rope_theta`, checked against these periods
        elif block and block.group(2) == "attn.m":
            slopes[int(block.group(1))] = tensor.reshape(-1).clone()
        elif block:
            entries = _dinov3_attention_entries(*block.groups(), tensor, architecture["key_bias"])
            converted.update({name: part.clone() for name, part in entries.items()})
        else:
            unexpected.append(key)
    _finish_mapping(converted, unexpected, slopes, "dinov3", "model.alibi.slopes")
    converted.setdefault("embeddings.register_tokens", torch.zeros(1, 0, hidden_size))
    converted.setdefault("embeddings.mask_token", torch.zeros(1, 1, hidden_size))
    return converted, architecture


def _position_scheme(kept: bool, has_slopes: bool, name: str, requested: str, family: "ModelFamily") -> str:
    """How a state-dict source encodes positions: `kept` (a non-zero learned embedding, or RoPE periods) and ALiBi
    slopes, or the `requested` scheme."""
    if requested != "auto":
        if requested in ("learned", "rope") and requested != family.kept_scheme:
            raise InputError(
                f"--source_position {requested} does not apply to {family.title} checkpoints, which keep positions as "
                f"{family.kept_scheme}: use {family.kept_scheme}, alibi, nope or auto."
            )
        return requested
    parts = ([family.kept_scheme] if kept else []) + (["alibi"] if has_slopes else [])
    if parts:
        return "+".join(parts)
    # No position embedding, no RoPE and no slopes: the reference releases name their NoPE files "nope_...".
    return "nope" if "nope" in Path(name).name.lower() else "alibi"


def _scheme_of_config(config, family: "ModelFamily") -> str:
    parts = [family.kept_scheme] if getattr(config, family.kept_flag) else []
    parts += ["alibi"] if config.use_alibi else []
    return "+".join(parts) or "nope"


# transformers' own model types the converter reads: (family, class name in transformers).
STOCK_HF_MODELS = {
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel"),
    "dinov3_vit": ("dinov3", "DINOv3ViTModel"),
}


def read_hf_source(source, revision: str | None = None) -> SourceCheckpoint:
    """A transformers DINOv2 or DINOv3 model (Hub id or folder), loaded with transformers' own classes, or a folder
    of this project's models."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=True)
    own = {family.model_type: family for family in FAMILIES.values()}
    if config.model_type in own:
        family = own[config.model_type]
        model = family.model_class.from_pretrained(source, revision=revision)
        config_fields = model.config.to_dict()
        architecture = {k: config_fields[k] for k in family.architecture_fields}
        alibi_options = {k: config_fields[k] for k in _ALIBI_FIELDS}
        scheme = _scheme_of_config(model.config, family)
        return SourceCheckpoint(model.state_dict(), architecture, "hf", scheme, str(source), alibi_options, family.name)
    if config.model_type not in STOCK_HF_MODELS:
        readable = ", ".join(f"`{name}`" for name in (*STOCK_HF_MODELS, *own))
        raise ValueError(f"{source} is a `{config.model_type}` model; the converter reads {readable} models.")
    family_name, class_name = STOCK_HF_MODELS[config.model_type]
    family = FAMILIES[family_name]
    state_dict = getattr(transformers, class_name).from_pretrained(source, revision=revision).state_dict()
    architecture = {k: getattr(config, k) for k in family.architecture_fields if hasattr(config, k)}
    if family_name == "dinov2":
        if "embeddings.mask_token" not in state_dict:  # Dinov2Config(use_mask_token=False)
            state_dict["embeddings.mask_token"] = torch.zeros(1, config.hidden_size)
        architecture["num_register_tokens"] = getattr(config, "num_register_tokens", 0)
        # transformers resizes a learned embedding with antialiasing in the registers class only.
        architecture["interpolate_antialias"] = config.model_type == "dinov2_with_registers"
    return SourceCheckpoint(state_dict, architecture, "hf", family.kept_scheme, str(source), family=family_name)


_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "hidden_act",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "layerscale_value",
    "use_swiglu_ffn",
    "num_register_tokens",
)
_DINOV3_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "rope_theta",
    "image_size",
    "patch_size",
    "num_channels",
    "query_bias",
    "key_bias",
    "value_bias",
    "proj_bias",
    "mlp_bias",
    "layerscale_value",
    "use_gated_mlp",
    "num_register_tokens",
    "pos_embed_shift",
    "pos_embed_jitter",
    "pos_embed_rescale",
)
_ALIBI_FIELDS = ("alibi_metric", "alibi_wrap", "alibi_normalize", "alibi_slopes", "alibi_jitter")
# Settings of the reference ALiBi checkpoints: constant slope, Euclidean, wrapped, normalised.
REFERENCE_ALIBI_OPTIONS = dict(alibi_metric="euclidean", alibi_wrap=True, alibi_normalize=True, alibi_slopes="constant")


@dataclass(frozen=True)
class ModelFamily:
    """One model type the converter builds: its classes, how it keeps positions, and what its card calls it."""

    name: str  # "dinov2" or "dinov3"
    model_type: str
    kept_scheme: str  # the stock position encoding: "learned" (embedding) or "rope"
    kept_flag: str  # the configuration field that keeps it
    position_keys: tuple  # state-dict keys of that encoding
    slopes_key: str  # state-dict key of learned ALiBi slopes
    architecture_fields: tuple
    title: str
    stock_name: str
    stock_class: str  # transformers' class with the same token layout
    kept_description: str
    config_class: type
    model_class: type


FAMILIES = {
    "dinov2": ModelFamily(
        name="dinov2",
        model_type="alibi_dinov2",
        kept_scheme="learned",
        kept_flag="use_absolute_position_embeddings",
        position_keys=("embeddings.position_embeddings",),
        slopes_key="encoder.alibi.slopes",
        architecture_fields=_ARCHITECTURE_FIELDS + ("interpolate_antialias",),
        title="ALiBi-DINOv2",
        stock_name="DINOv2",
        stock_class="Dinov2WithRegistersModel",
        kept_description="learned absolute position embedding",
        config_class=AlibiDinov2Config,
        model_class=AlibiDinov2Model,
    ),
    "dinov3": ModelFamily(
        name="dinov3",
        model_type="alibi_dinov3",
        kept_scheme="rope",
        kept_flag="use_rope",
        position_keys=(),  # RoPE has no weights
        slopes_key="model.alibi.slopes",
        architecture_fields=_DINOV3_ARCHITECTURE_FIELDS,
        title="ALiBi-DINOv3",
        stock_name="DINOv3",
        stock_class="DINOv3ViTModel",
        kept_description="RoPE",
        config_class=AlibiDinov3Config,
        model_class=AlibiDinov3Model,
    ),
}


def read_state_dict_source(path, name: str, source_format: str, num_heads: int | None, source_position: str):
    """A `.pth` / `.safetensors` file in the Meta, timm or dinov3 layout (`source_format` "auto": detected)."""
    raw_state_dict = read_state_dict_file(path)
    if source_format == "auto":
        source_format = detect_format(name, raw_state_dict)
    if source_format == "dinov3":
        family = FAMILIES["dinov3"]
        read_rope = source_position in ("auto", "rope")
        state_dict, architecture = convert_dinov3_state_dict(raw_state_dict, num_heads, read_rope)
        kept = "rope_theta" in architecture
    else:
        family = FAMILIES["dinov2"]
        state_dict, architecture = convert_vit_state_dict(raw_state_dict, source_format, num_heads)
        position = state_dict.get("embeddings.position_embeddings")
        kept = position is not None and position.count_nonzero() > 0
        # Resizing a learned embedding: timm antialiases; Meta's hub code does for its register models only (its
        # other models also offset the scale by 0.1, which transformers' Dinov2Model, followed here, does not).
        architecture["interpolate_antialias"] = source_format == "timm" or architecture["num_register_tokens"] > 0
    has_slopes = family.slopes_key in state_dict
    scheme = _position_scheme(kept, has_slopes, name, source_position, family)
    alibi_options = dict(REFERENCE_ALIBI_OPTIONS, **({"alibi_slopes": "learned"} if has_slopes else {}))
    return SourceCheckpoint(state_dict, architecture, source_format, scheme, name, alibi_options, family.name)


def read_source(
    source,
    source_format: str = "auto",
    num_heads: int | None = None,
    source_position: str = "auto",
    revision: str | None = None,
    sha256: str | None = None,
) -> SourceCheckpoint:
    """Read any supported checkpoint into this project's parameter names.

    `source` may name a `.pth` by URL (`hf://OWNER/REPO/FILE`, a Hub file URL, a plain `https://` URL): it is fetched
    into its cache first (`alibi_dinov2.hub.remote_files.fetch_file`, at `revision`; `sha256` checks the file).
    """
    _check_choice("source_format", source_format, SOURCE_FORMATS)
    _check_choice("source_position", source_position, POSITION_SCHEMES)
    name, remote = str(source), is_remote_file(source)
    if remote or sha256 is not None:
        source = fetch_file(source, revision=revision, sha256=sha256)
    if source_format == "hf" or (source_format == "auto" and not remote and not _is_checkpoint_file(source)):
        return read_hf_source(source, revision=revision)
    if not Path(str(source)).is_file():
        raise FileNotFoundError(f"No checkpoint file at {source}.")
    return read_state_dict_source(source, name, source_format, num_heads, source_position)


# --- building the model --------------------------------------------------------------------------------------------


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def build_model(checkpoint: SourceCheckpoint, variant: str = "alibi", **alibi_options):
    """An `AlibiDinov2Model` or `AlibiDinov3Model` (the checkpoint's family) of the requested variant holding the
    checkpoint's weights.

    `keep-pe` reproduces the source (its learned embedding or RoPE, its ALiBi, or both); `alibi` and `nope` drop any
    learned position embedding or RoPE. `alibi_options` (`alibi_metric`, `alibi_slopes`, ...) override the defaults,
    and for an ALiBi source, its own settings.
    """
    _check_choice("variant", variant, VARIANTS)
    unknown = set(alibi_options) - set(_ALIBI_FIELDS)
    if unknown:
        raise ValueError(f"Unknown ALiBi option(s) {sorted(unknown)}; allowed: {', '.join(_ALIBI_FIELDS)}.")
    family = FAMILIES[checkpoint.family]
    parts = (checkpoint.position_scheme if variant == "keep-pe" else variant).split("+")
    options = dict(checkpoint.alibi_options) if "alibi" in checkpoint.position_scheme.split("+") else {}
    options.update({k: v for k, v in alibi_options.items() if v is not None})
    config = family.config_class(
        **checkpoint.architecture, use_alibi="alibi" in parts, **{family.kept_flag: family.kept_scheme in parts}, **options
    )
    state_dict = dict(checkpoint.state_dict)
    if family.kept_scheme not in parts:
        for key in family.position_keys:
            state_dict.pop(key, None)
    slopes = state_dict.pop(family.slopes_key, None)
    model = family.model_class(config)
    if config.use_alibi and config.alibi_slopes == "learned":
        if slopes is None:
            slopes = torch.ones(config.num_hidden_layers, config.num_attention_heads)  # start from the paper's m = 1
        state_dict[family.slopes_key] = slopes
    if "embeddings.register_tokens" not in model.state_dict():  # DINOv2 without registers has no such parameter
        state_dict.pop("embeddings.register_tokens", None)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointKeyError(
            f"The checkpoint does not fit the model. Missing: {', '.join(result.missing_keys) or 'none'}. "
            f"Unexpected: {', '.join(result.unexpected_keys) or 'none'}."
        )
    model.config.name_or_path = checkpoint.name
    return model.eval()


# --- writing the output folder -------------------------------------------------------------------------------------


def save_image_processor(output_dir) -> None:
    """DINOv2's preprocessing (shortest side 256, centre crop 224, ImageNet normalisation), the processor every
    folder carries; see `alibi_dinov2.features.preprocessing.dinov2_image_processor`."""
    dinov2_image_processor().save_pretrained(output_dir)


def evaluation_table(results: dict | None) -> str:
    """Markdown table of `{metric: value}` (or `{metric: {model: value}}`) results, between markers that
    `update_model_card_evaluation` replaces."""
    rows = ["| metric | value |", "|---|---|"]
    for metric, value in (results or {}).items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {_format_number(v)}" for k, v in value.items())
        rows.append(f"| {metric} | {_format_number(value)} |")
    if len(rows) == 2:
        rows.append("| *not evaluated yet* | |")
    return "\n".join([EVALUATION_START, *rows, EVALUATION_END])


def _format_number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_model_card(
    model,
    repo_id: str | None = None,
    base_model: str | None = None,
    hyperparameters: dict | None = None,
    evaluation_results: dict | None = None,
):
    """A `huggingface_hub.ModelCard` describing the converted model, with usage and an evaluation table."""
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    family = family_of(config)
    variant = "ALiBi" if config.use_alibi else (family.kept_description if getattr(config, family.kept_flag) else "NoPE")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="apache-2.0",
        base_model=_hub_id_or_none(base_model),
        tags=["alibi-dinov2", family.name, "alibi", "vision", "image-feature-extraction", "microscopy", f"arxiv:{PAPER_ARXIV_ID}"],
    )
    name = repo_id or FOLDER_PLACEHOLDER
    settings = "\n".join(
        f"| `{key}` | `{getattr(config, key)}` |"
        for key in ("use_alibi", family.kept_flag, *_ALIBI_FIELDS, "num_register_tokens", "patch_size")
    )
    hyper = ""
    if hyperparameters:
        hyper = "\n## Training hyperparameters\n\n| name | value |\n|---|---|\n" + "\n".join(
            f"| `{k}` | `{v}` |" for k, v in hyperparameters.items()
        ) + "\n"
    content = f"""---
{data.to_yaml()}
---

# {family.title} ({variant})

{family.stock_name} ViT-{_size_name(config)}/{config.patch_size} whose {family.kept_description} is
replaced by a 2D ALiBi attention bias (`-m * d(i, j) / d_max` between patch positions), so that its patch
features describe what a patch shows rather than where it sits. Converted from `{base_model or config.name_or_path}`.
Method: [What DINO saw: ALiBi positional encoding reduces positional bias in Vision Transformers](https://arxiv.org/abs/{PAPER_ARXIV_ID}).

## Usage

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{name}", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("{name}")
image = Image.open("micrograph.png").convert("RGB")
# Dense features of the whole image: no centre crop (and do_resize=False keeps the native size).
inputs = processor(images=image, return_tensors="pt", do_center_crop=False)
with torch.no_grad():
    features = model.get_patch_features(inputs.pixel_values)  # (1, {config.hidden_size}, H // {config.patch_size}, W // {config.patch_size})
```

`last_hidden_state` is `[CLS, {config.num_register_tokens} registers, patches]` after the final LayerNorm, as in
transformers' `{family.stock_class}`. The model takes any input of at least one patch per side.

## Demo

Compare this model with stock {family.stock_name} in the browser: PCA colours and k-means clusters of the patch features of
your own micrographs (PNG, JPEG, 8/16-bit TIFF), and how well a linear probe recovers each patch's position from
them. From the alibi-dinov2 source tree:

```bash
pip install -e ".[eval,demo]"
python -m demo.app --models {_comparison_model(config, base_model)} {name}
```

## Settings

| option | value |
|---|---|
{settings}
{hyper}
## Evaluation

{evaluation_table(evaluation_results)}
"""
    return ModelCard(content)


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` when it reads as a Hub id (`owner/model`, not a local path), else None."""
    return name if name and "/" in name and not Path(name).exists() else None


def _comparison_model(config, base_model: str | None) -> str:
    """The stock model the demo compares with: the hub model this one was converted from, else the hub DINOv2 or
    DINOv3 of the same size (and, for DINOv2, register layout)."""
    if _hub_id_or_none(base_model):
        return base_model
    if family_of(config).name == "dinov3":
        suffix = DINOV3_SIZES.get((config.hidden_size, config.use_gated_mlp), ("S+", "vits16plus"))[1]
        return f"facebook/dinov3-{suffix}-pretrain-lvd1689m"
    size = DINOV2_SIZES.get(config.hidden_size, ("S", "small"))[1]
    return f"facebook/dinov2-with-registers-{size}" if config.num_register_tokens else f"facebook/dinov2-{size}"


# DINOv2 sizes by hidden size: (ViT size letter, Hub name suffix).
DINOV2_SIZES = {384: ("S", "small"), 768: ("B", "base"), 1024: ("L", "large"), 1536: ("g", "giant")}
# DINOv3 sizes by (hidden size, gated MLP): (ViT size name, Hub name part: facebook/dinov3-PART-pretrain-lvd1689m).
DINOV3_SIZES = {
    (384, False): ("S", "vits16"),
    (384, True): ("S+", "vits16plus"),
    (768, False): ("B", "vitb16"),
    (1024, False): ("L", "vitl16"),
    (1280, True): ("H+", "vith16plus"),
    (4096, True): ("7B", "vit7b16"),
}


def family_of(config) -> ModelFamily:
    """The family of a configuration of this project's models."""
    return next(family for family in FAMILIES.values() if family.model_type == config.model_type)


def _size_name(config) -> str:
    if family_of(config).name == "dinov3":
        return DINOV3_SIZES.get((config.hidden_size, config.use_gated_mlp), (f"{config.hidden_size}d",))[0]
    return DINOV2_SIZES[config.hidden_size][0] if config.hidden_size in DINOV2_SIZES else f"{config.hidden_size}d"


def update_model_card_evaluation(
    folder,
    results: dict | None = None,
    *,
    table: str | None = None,
    eval_results: list | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
) -> None:
    """Replace the evaluation table of `folder/README.md` (appended when the card has none) and, optionally, its
    metadata; the file is rewritten atomically.

    Args:
        results: `{metric: value}` for :func:`evaluation_table`, or `table`, ready Markdown put between the markers.
        eval_results: `huggingface_hub.EvalResult`s, written as the card's `model-index` (the Hub shows them), under
            `model_name` (default: `repo_id`, else the folder's name).
        repo_id: the Hub repository the card now names in its usage snippets instead of the folder placeholder.
        base_model: the card's `base_model` when it is a Hub id.
    """
    from huggingface_hub import ModelCard

    card_path = Path(folder) / "README.md"
    card = ModelCard.load(card_path)
    block = "\n".join([EVALUATION_START, table.strip(), EVALUATION_END]) if table is not None else evaluation_table(results)
    text = card.text
    if EVALUATION_START in text and EVALUATION_END in text:
        start, end = text.index(EVALUATION_START), text.index(EVALUATION_END) + len(EVALUATION_END)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip() + "\n\n## Evaluation\n\n" + block + "\n"
    if repo_id:
        text = text.replace(FOLDER_PLACEHOLDER, repo_id)
    card.text = text
    if eval_results is not None:
        card.data.eval_results = list(eval_results)
        card.data.model_name = model_name or repo_id or Path(folder).resolve().name
    if _hub_id_or_none(base_model):
        card.data.base_model = base_model
    write_text_atomic(card_path, str(card))


def save_model_folder(
    model,
    output_dir,
    base_model: str | None = None,
    repo_id: str | None = None,
    hyperparameters: dict | None = None,
    evaluation_results: dict | None = None,
) -> Path:
    """Write a remote-code folder: config (with `auto_map`), safetensors weights, both model files, the image
    processor and a model card."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    save_image_processor(output_dir)
    card = build_model_card(model, repo_id, base_model, hyperparameters, evaluation_results)
    card.save(output_dir / "README.md")
    return output_dir


def convert(
    source=DEFAULT_SOURCE,
    output_dir=None,
    variant: str = "alibi",
    source_format: str = "auto",
    num_heads: int | None = None,
    source_position: str = "auto",
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    sha256: str | None = None,
    **alibi_options,
):
    """Convert `source` into an `AlibiDinov2Model` or, from a DINOv3 source, an `AlibiDinov3Model` of `variant`;
    with `output_dir`, also write the publishable folder (and upload it with `push_to_hub=REPO_ID`).

    Raises:
        SourceNotFoundError: `source` is neither a file, a folder, a Hub id nor a file URL (checked before any Hub
            call), or, offline, a file URL that is not in the cache.
    """
    source = check_model_source(source, what="checkpoint")
    checkpoint = read_source(source, source_format, num_heads, source_position, revision, sha256)
    model = build_model(checkpoint, variant, **alibi_options)
    if output_dir is not None:
        base_model = str(source) if checkpoint.source_format == "hf" else None
        save_model_folder(model, output_dir, base_model=base_model, repo_id=push_to_hub)
        if push_to_hub:
            push_folder(output_dir, push_to_hub, private=private, commit_message=f"Converted {family_of(model.config).title}")
    return model


@dataclass
class ConvertArguments:
    """Options of `python convert_checkpoint.py SOURCE OUTPUT_DIR`."""

    source: str = field(metadata={"help": "Hub id, transformers folder, Meta (DINOv2 or dinov3) or timm .pth: a path, "
                                          "hf://OWNER/REPO/FILE, a Hub file URL or an https:// URL"})
    output_dir: str = field(metadata={"help": "folder to write"})
    variant: Literal["alibi", "nope", "keep-pe"] = field(default="alibi", metadata={"help": "what to build"})
    source_format: Literal["auto", "hf", "meta", "timm", "dinov3"] = field(
        default="auto", metadata={"help": "layout of the source (dinov3: Meta's dinov3 layout)"}
    )
    source_position: Literal["auto", "learned", "rope", "alibi", "nope"] = field(
        default="auto",
        metadata={"help": "how a .pth source encodes positions (auto: learned if it has a non-zero embedding, rope if "
                          "it has RoPE periods, ALiBi with learned slopes if it has them; else ALiBi, or NoPE when the "
                          "file name says 'nope')"},
    )
    num_heads: int | None = field(default=None, metadata={"help": "attention heads of a .pth source (default hidden / "
                                                                  "head size: 64, or 4 x the RoPE periods)"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag, commit) of a Hub model or file"})
    sha256: str | None = field(default=None, metadata={"help": "expected SHA-256 of the checkpoint file (checked, also "
                                                               "when it comes from a cache)"})
    alibi_metric: Literal["euclidean", "manhattan"] | None = field(default=None, metadata={"help": "distance metric"})
    alibi_wrap: bool | None = field(default=None, metadata={"help": "true or false: wrapped (toroidal) distances"})
    alibi_normalize: bool | None = field(default=None, metadata={"help": "true or false: divide by the largest distance"})
    alibi_slopes: Literal["constant", "geometric", "learned"] | None = field(default=None, metadata={"help": "head slopes"})
    alibi_jitter: float | None = field(default=None, metadata={"help": "std of Gaussian noise added to the bias"})
    push_to_hub: str | None = field(default=None, metadata={"help": "upload the folder to this Hub repository id"})
    private: bool = field(default=False, metadata={"help": "with --push_to_hub: create a private repository"})


def parse_args(argv=None) -> ConvertArguments:
    parser = ArgumentParser(ConvertArguments, positionals=("source", "output_dir"), prog="convert_checkpoint.py",
                            description=__doc__.split("\n\n")[0])
    (args,) = parser.parse(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    alibi_options = {name: getattr(args, name) for name in _ALIBI_FIELDS}
    model = convert(
        args.source,
        args.output_dir,
        variant=args.variant,
        source_format=args.source_format,
        num_heads=args.num_heads,
        source_position=args.source_position,
        push_to_hub=args.push_to_hub,
        private=args.private,
        revision=args.revision,
        sha256=args.sha256,
        **alibi_options,
    )
    kept_flag = family_of(model.config).kept_flag
    summary = {k: getattr(model.config, k) for k in ("use_alibi", kept_flag, *_ALIBI_FIELDS)}
    print(f"wrote {args.output_dir}: {json.dumps(summary)}")
    return model


if __name__ == "__main__":
    run_command(main)
