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
(`https://huggingface.co/OWNER/REPO/resolve/REV/FILE`, `.../blob/REV/FILE`), fetched into the Hub cache at
`--revision`, or a plain `https://` URL, downloaded once into torch.hub's cache and checked against `--sha256` when
given. Offline (`HF_HUB_OFFLINE=1`) only cached files are read.

Variants: `alibi` (learned position embedding or RoPE dropped, ALiBi on), `nope` (neither), `keep-pe` (the source's
own position scheme, reproducing its outputs: for parity checks).

    python convert_checkpoint.py facebook/dinov2-with-registers-small out/alibi-dinov2-small
    python convert_checkpoint.py dinov2_vits14_reg4_pretrain.pth out/nope --variant nope
    python convert_checkpoint.py alibi_dv2_vits14_reg4.pth out/alibi --push_to_hub --hub_model_id me/alibi-dinov2-small
    python convert_checkpoint.py hf://rmdocherty/dino-saw/alibi_coco_dv2_vits14_reg4.pth out/alibi-coco
    python convert_checkpoint.py facebook/dinov3-vits16plus-pretrain-lvd1689m out/alibi-dinov3-small-plus
    python convert_checkpoint.py hf://rmdocherty/dino-saw/alibi_coco_dv3_vits16_plus_reg4.pth out/alibi-dinov3-coco

`.pth` files are read with `torch.load(..., weights_only=True)` only and never modified. Settings the reference
ALiBi files record in their names only (`nope`, `no_norm`, `no_wrap`) are read from the name
(`alibi_dinov2.conversion.file_names`); the training-only `local_cls_norm.*` of Meta's dinov3 ViT-7B/16 and SAT-493M
ViT-L/16 is dropped. A refusal is one line naming the file, the problem and the fix.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alibi_dinov2.cli import ArgumentParser, run_command
from alibi_dinov2.conversion.convert import convert
from alibi_dinov2.conversion.families import ALIBI_FIELDS, family_of


# --- reading sources -----------------------------------------------------------------------------------------------


















































# --- building the model --------------------------------------------------------------------------------------------






# --- writing the output folder -------------------------------------------------------------------------------------


























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
        metadata={
            "help": (
                "how a .pth source encodes positions (auto: learned if it has a non-zero embedding, rope if "
                "it has RoPE periods, ALiBi with learned slopes if it has them; else ALiBi, or NoPE when the "
                "file name says 'nope')"
            )
        },
    )
    num_heads: int | None = field(default=None, metadata={"help": "attention heads of a .pth source (default hidden / "
                                                                  "head size: 64, or 4 x the RoPE periods)"})
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag, commit) of a Hub model or file"}
    )
    sha256: str | None = field(
        default=None,
        metadata={"help": "expected SHA-256 of the checkpoint file (checked, also when it comes from a cache)"},
    )
    alibi_metric: Literal["euclidean", "manhattan"] | None = field(default=None, metadata={"help": "distance metric"})
    alibi_wrap: bool | None = field(default=None, metadata={"help": "true or false: wrapped (toroidal) distances"})
    alibi_normalize: bool | None = field(
        default=None, metadata={"help": "true or false: divide by the largest distance"}
    )
    alibi_slopes: Literal["constant", "geometric", "learned"] | None = field(
        default=None, metadata={"help": "head slopes"}
    )
    alibi_jitter: float | None = field(default=None, metadata={"help": "std of Gaussian noise added to the bias"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the folder to the Hub"})
    hub_model_id: str | None = field(default=None, metadata={"help": "repository id of --push_to_hub (default: the "
                                                                   "name of OUTPUT_DIR)"})
    hub_private_repo: bool = field(default=False, metadata={"help": "with --push_to_hub: create a private repository"})


def build_parser() -> ArgumentParser:
    """The command-line parser over [`ConvertArguments`] (SOURCE and OUTPUT_DIR may come as bare words)."""
    return ArgumentParser(ConvertArguments, positionals=("source", "output_dir"), prog="convert_checkpoint.py",
                          description=__doc__.split("\n\n")[0])


def parse_args(argv=None) -> ConvertArguments:
    (args,) = build_parser().parse(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    alibi_options = {name: getattr(args, name) for name in ALIBI_FIELDS}
    model = convert(
        args.source,
        args.output_dir,
        variant=args.variant,
        source_format=args.source_format,
        num_heads=args.num_heads,
        source_position=args.source_position,
        push_to_hub=(args.hub_model_id or Path(args.output_dir).resolve().name) if args.push_to_hub else None,
        private=args.hub_private_repo,
        revision=args.revision,
        sha256=args.sha256,
        **alibi_options,
    )
    kept_flag = family_of(model.config).kept_flag
    summary = {k: getattr(model.config, k) for k in ("use_alibi", kept_flag, *ALIBI_FIELDS)}
    print(f"wrote {args.output_dir}: {json.dumps(summary)}")
    return model


if __name__ == "__main__":
    run_command(main)
