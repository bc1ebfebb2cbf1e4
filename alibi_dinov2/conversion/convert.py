"""Read, build, write: a source checkpoint becomes an ALiBi (or NoPE, or unchanged) model of its family, saved as a
ready-to-publish folder with its remote code, image processor and model card."""

from __future__ import annotations

from pathlib import Path

import torch

from alibi_dinov2.conversion.families import ALIBI_FIELDS, FAMILIES, family_of
from alibi_dinov2.conversion.model_card import build_model_card
from alibi_dinov2.conversion.sources import DEFAULT_SOURCE, SourceCheckpoint, check_choice, read_source
from alibi_dinov2.conversion.state_dicts import CheckpointKeyError, key_list
from alibi_dinov2.errors import InputError
from alibi_dinov2.features.preprocessing import dinov2_image_processor
from alibi_dinov2.hub.push import push_to_hub as push_folder
from alibi_dinov2.hub.sources import check_model_source


VARIANTS = ("alibi", "nope", "keep-pe")



def build_model(checkpoint: SourceCheckpoint, variant: str = "alibi", **alibi_options):
    """An `AlibiDinov2Model` or `AlibiDinov3Model` (the checkpoint's family) of the requested variant holding the
    checkpoint's weights.

    `keep-pe` reproduces the source (its learned embedding or RoPE, its ALiBi, or both); `alibi` and `nope` drop any
    learned position embedding or RoPE. `alibi_options` (`alibi_metric`, `alibi_slopes`, ...) override the defaults,
    and for an ALiBi source, its own settings.
    """
    check_choice("variant", variant, VARIANTS)
    unknown = set(alibi_options) - set(ALIBI_FIELDS)
    if unknown:
        raise InputError(f"unknown ALiBi option(s) {sorted(unknown)}; allowed: {', '.join(ALIBI_FIELDS)}")
    family = FAMILIES[checkpoint.family]
    parts = (checkpoint.position_scheme if variant == "keep-pe" else variant).split("+")
    options = dict(checkpoint.alibi_options) if "alibi" in checkpoint.position_scheme.split("+") else {}
    options.update({k: v for k, v in alibi_options.items() if v is not None})
    try:
        config = family.config_class(
            **checkpoint.architecture,
            use_alibi="alibi" in parts,
            **{family.kept_flag: family.kept_scheme in parts},
            **options,
        )
    except ValueError as error:  # an option out of range, such as a negative jitter
        raise InputError(f"{checkpoint.name}: {error}") from None
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
            f"{checkpoint.name} does not fit the model. Missing: {key_list(result.missing_keys) or 'none'}. "
            f"Unexpected: {key_list(result.unexpected_keys) or 'none'}. Check --source_format and --num_heads."
        )
    model.config.name_or_path = checkpoint.name
    return model.eval()



def save_image_processor(output_dir) -> None:
    """DINOv2's preprocessing (shortest side 256, centre crop 224, ImageNet normalisation), the processor every
    folder carries; see `alibi_dinov2.features.preprocessing.dinov2_image_processor`."""
    dinov2_image_processor().save_pretrained(output_dir)



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
            push_folder(
                output_dir, push_to_hub, private=private, commit_message=f"Converted {family_of(model.config).title}"
            )
    return model

