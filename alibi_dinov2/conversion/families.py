"""The model families the converter builds: ALiBi-DINOv2 and ALiBi-DINOv3, each with its configuration and model
classes, the architecture fields read from a source, and how a source's position scheme is named."""

from __future__ import annotations

from dataclasses import dataclass

from alibi_dinov2.conversion.file_names import read_name_settings
from alibi_dinov2.errors import InputError
from configuration_alibi_dinov2 import AlibiDinov2Config
from configuration_alibi_dinov3 import AlibiDinov3Config
from modeling_alibi_dinov2 import AlibiDinov2Model
from modeling_alibi_dinov3 import AlibiDinov3Model


# How a checkpoint encodes positions: a learned absolute embedding (DINOv2) or RoPE (DINOv3), the ALiBi bias, both
# ("learned+alibi", "rope+alibi"), or nothing. `--source_position` names one of the single ones.
POSITION_SCHEMES = ("auto", "learned", "rope", "alibi", "nope")


def position_scheme(kept: bool, has_slopes: bool, name: str, requested: str, family: "ModelFamily") -> str:
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
    return "nope" if "nope" in read_name_settings(name).scheme_tokens else "alibi"


def scheme_of_config(config, family: "ModelFamily") -> str:
    parts = [family.kept_scheme] if getattr(config, family.kept_flag) else []
    parts += ["alibi"] if config.use_alibi else []
    return "+".join(parts) or "nope"


ALIBI_FIELDS = ("alibi_metric", "alibi_wrap", "alibi_normalize", "alibi_slopes", "alibi_jitter")


# Settings of the reference ALiBi checkpoints: constant slope, Euclidean, wrapped, normalised.
REFERENCE_ALIBI_OPTIONS = dict(
    alibi_metric="euclidean", alibi_wrap=True, alibi_normalize=True, alibi_slopes="constant"
)


ARCHITECTURE_FIELDS = (
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

DINOV3_ARCHITECTURE_FIELDS = (
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
        architecture_fields=ARCHITECTURE_FIELDS + ("interpolate_antialias",),
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
        architecture_fields=DINOV3_ARCHITECTURE_FIELDS,
        title="ALiBi-DINOv3",
        stock_name="DINOv3",
        stock_class="DINOv3ViTModel",
        kept_description="RoPE",
        config_class=AlibiDinov3Config,
        model_class=AlibiDinov3Model,
    ),
}


def family_of(config, default: str | None = None) -> ModelFamily:
    """The family of a configuration of this project's models; for a configuration of another model type, the
    family named `default` (as `"dinov2"`), or an `InputError` naming the type when `default` is None."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    if default is None:
        raise InputError(
            f"{model_type!r} is not a model type of this project "
            f"({', '.join(f.model_type for f in FAMILIES.values())})"
        )
    return FAMILIES[default]
