"""The model card of a converted folder: usage, provenance and the evaluation table that `alibi-publish` fills in."""

from __future__ import annotations

from pathlib import Path

from alibi_dinov2.conversion.families import ALIBI_FIELDS, DINOV2_SIZES, DINOV3_SIZES, family_of
from alibi_dinov2.io.files import write_text_atomic


PAPER_ARXIV_ID = "2603.16840"



# What a card calls the model until it knows its Hub repository.
FOLDER_PLACEHOLDER = "path/to/this/folder"



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
    variant = (
        "ALiBi" if config.use_alibi else (family.kept_description if getattr(config, family.kept_flag) else "NoPE")
    )
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="apache-2.0",
        base_model=_hub_id_or_none(base_model),
        tags=[
            "alibi-dinov2",
            family.name,
            "alibi",
            "vision",
            "image-feature-extraction",
            "microscopy",
            f"arxiv:{PAPER_ARXIV_ID}",
        ],
    )
    name = repo_id or FOLDER_PLACEHOLDER
    settings = "\n".join(
        f"| `{key}` | `{getattr(config, key)}` |"
        for key in ("use_alibi", family.kept_flag, *ALIBI_FIELDS, "num_register_tokens", "patch_size")
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
    features = model.get_patch_features(inputs.pixel_values)  # (1, {config.hidden_size}, \
H // {config.patch_size}, W // {config.patch_size})
```

`last_hidden_state` is `[CLS, {config.num_register_tokens} registers, patches]` after the final LayerNorm, as in
transformers' `{family.stock_class}`. The model takes any input of at least one patch per side.

## Demo

Compare this model with stock {family.stock_name} in the browser: PCA colours and k-means clusters of the patch \
features of
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
    block = (
        "\n".join([EVALUATION_START, table.strip(), EVALUATION_END])
        if table is not None
        else evaluation_table(results)
    )
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


EVALUATION_START, EVALUATION_END = "<!-- evaluation-table:start -->", "<!-- evaluation-table:end -->"
