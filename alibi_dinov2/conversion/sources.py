"""Reading a source checkpoint (a transformers folder or Hub id, or a state-dict file by path or URL) into one
:class:`SourceCheckpoint`: its family, architecture, position scheme and weights in the transformers layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from alibi_dinov2.conversion.families import (
    ALIBI_FIELDS,
    FAMILIES,
    POSITION_SCHEMES,
    REFERENCE_ALIBI_OPTIONS,
    position_scheme,
    scheme_of_config,
)
from alibi_dinov2.conversion.file_names import alibi_options_of_name
from alibi_dinov2.conversion.state_dicts import (
    SOURCE_FORMATS,
    CheckpointKeyError,
    convert_dinov3_state_dict,
    convert_vit_state_dict,
    detect_format,
    is_checkpoint_file,
    named_file,
    read_state_dict_file,
)
from alibi_dinov2.errors import InputError, SourceNotFoundError, first_line
from alibi_dinov2.hub.remote_files import fetch_file, is_remote_file


DEFAULT_SOURCE = "facebook/dinov2-with-registers-small"



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

    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=True)
    except (OSError, ValueError) as error:  # a folder without config.json, an unknown model type
        reason = first_line(error) or type(error).__name__
        raise InputError(
            f"{source}: not a transformers model ({reason}): give a model folder with config.json, a Hub id, or a "
            ".pth / .safetensors state dict"
        ) from None
    own = {family.model_type: family for family in FAMILIES.values()}
    if config.model_type in own:
        family = own[config.model_type]
        model = family.model_class.from_pretrained(source, revision=revision)
        config_fields = model.config.to_dict()
        architecture = {k: config_fields[k] for k in family.architecture_fields}
        alibi_options = {k: config_fields[k] for k in ALIBI_FIELDS}
        scheme = scheme_of_config(model.config, family)
        return SourceCheckpoint(
            model.state_dict(), architecture, "hf", scheme, str(source), alibi_options, family.name
        )
    if config.model_type not in STOCK_HF_MODELS:
        readable = ", ".join(f"`{name}`" for name in (*STOCK_HF_MODELS, *own))
        raise InputError(f"{source} is a `{config.model_type}` model; the converter reads {readable} models")
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






def read_state_dict_source(path, name: str, source_format: str, num_heads: int | None, source_position: str):
    """A `.pth` / `.safetensors` file in the Meta, timm or dinov3 layout (`source_format` "auto": detected)."""
    raw_state_dict = read_state_dict_file(path)
    if source_format == "auto":
        source_format = detect_format(name, raw_state_dict)
    try:
        if source_format == "dinov3":
            family = FAMILIES["dinov3"]
            read_rope = source_position in ("auto", "rope")
            state_dict, architecture = convert_dinov3_state_dict(raw_state_dict, num_heads, read_rope)
        else:
            family = FAMILIES["dinov2"]
            state_dict, architecture = convert_vit_state_dict(raw_state_dict, source_format, num_heads)
    except CheckpointKeyError as error:
        raise named_file(error, name) from None
    if family.name == "dinov3":
        kept = "rope_theta" in architecture
    else:
        position = state_dict.get("embeddings.position_embeddings")
        kept = position is not None and position.count_nonzero() > 0
        # Resizing a learned embedding: timm antialiases; Meta's hub code does for its register models only (its
        # other models also offset the scale by 0.1, which transformers' Dinov2Model, followed here, does not).
        architecture["interpolate_antialias"] = source_format == "timm" or architecture["num_register_tokens"] > 0
    has_slopes = family.slopes_key in state_dict
    scheme = position_scheme(kept, has_slopes, name, source_position, family)
    alibi_options = dict(REFERENCE_ALIBI_OPTIONS, **({"alibi_slopes": "learned"} if has_slopes else {}))
    alibi_options.update(alibi_options_of_name(name, scheme, has_slopes))
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
    check_choice("source_format", source_format, SOURCE_FORMATS)
    check_choice("source_position", source_position, POSITION_SCHEMES)
    name, remote = str(source), is_remote_file(source)
    if remote or sha256 is not None:
        source = fetch_file(source, revision=revision, sha256=sha256)
    if source_format == "hf" or (source_format == "auto" and not remote and not is_checkpoint_file(source)):
        return read_hf_source(source, revision=revision)
    if not Path(str(source)).is_file():
        raise SourceNotFoundError(f"not found: no checkpoint file at {source}")
    return read_state_dict_source(source, name, source_format, num_heads, source_position)



def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")

