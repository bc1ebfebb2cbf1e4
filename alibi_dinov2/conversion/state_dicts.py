"""Checkpoint state dicts mapped key by key, strictly, onto the transformers layout: Meta's DINOv2 and timm
ViTs (`convert_vit_state_dict`) and Meta's dinov3 layout (`convert_dinov3_state_dict`); `.pth` files are read with
`torch.load(..., weights_only=True)` only."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from alibi_dinov2.errors import InputError, first_line


logger = logging.getLogger(__name__)


SOURCE_FORMATS = ("auto", "hf", "meta", "timm", "dinov3")



KEY_PREFIXES = ("model.", "vit.", "backbone.")



class CheckpointKeyError(InputError):
    """A state dict whose keys do not fit the expected layout (the reader names the file: see `named_file`)."""



def is_checkpoint_file(source) -> bool:
    return Path(str(source)).suffix in (".pth", ".pt", ".bin", ".safetensors") and Path(str(source)).is_file()



def read_state_dict_file(path) -> dict:
    """Tensors of a `.pth` / `.pt` / `.bin` (loaded with `weights_only=True`) or `.safetensors` file; a state dict
    wrapped in a dict under `model`, `state_dict`, `teacher` or `student` is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path))
        except Exception as error:  # a truncated or foreign file
            raise InputError(f"cannot read {path} as a safetensors file ({type(error).__name__}: "
                             f"{first_line(error)}): give an intact file") from None
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle with code, a truncated file, not a checkpoint at all
            reason = first_line(error)
            raise InputError(
                f"cannot read {path} as a weights-only PyTorch checkpoint ({type(error).__name__}: {reason}): only "
                "plain state dicts of tensors are read; save the model's state_dict() alone"
            ) from None
    for wrapper in ("model", "state_dict", "teacher", "student"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InputError(
            f"{path} does not hold a state dict of tensors: save the model's state_dict() (a dict of tensors) alone"
        )
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



def detect_format(source, state_dict: dict | None = None) -> str:
    """`hf` for a Hub id or a transformers folder; `meta`, `timm` or `dinov3` for a state-dict file, told apart by
    its keys (timm calls the registers `reg_token` and has no mask token; dinov3 calls them `storage_tokens` and has
    no learned position embedding)."""
    if state_dict is None and not is_checkpoint_file(source):
        return "hf"
    keys = set(strip_prefix(state_dict if state_dict is not None else read_state_dict_file(source)))
    if "blocks.0.attn.qkv.weight" not in keys:
        raise InputError(
            f"{source} is not a DINOv2 or DINOv3 ViT state dict (no `blocks.0.attn.qkv.weight`): give the "
            "backbone's weights (Meta, timm or dinov3 layout) or a transformers model folder"
        )
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
            f"{len(unexpected)} unexpected key(s) in the {layout} state dict: {key_list(unexpected)} (not part of a "
            f"{layout} ViT backbone: if the layout was detected wrongly, give --source_format; else save the "
            "backbone's weights alone)"
        )
    if slopes:
        converted[slopes_key] = torch.stack([slopes[i] for i in range(len(slopes))])



def key_list(keys, shown: int = 8) -> str:
    """`keys` sorted and joined for a one-line message, the first `shown` of them and how many more."""
    keys = sorted(keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more



def named_file(error: CheckpointKeyError, name) -> CheckpointKeyError:
    """`error` with the checkpoint's file name in front, for the one line a command prints."""
    return CheckpointKeyError(f"{name}: {error}")



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
        raise CheckpointKeyError(
            "Some blocks mask the key bias and others do not: one `key_bias` cannot describe both."
        )
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



def convert_dinov3_state_dict(
    state_dict: dict, num_heads: int | None = None, read_rope: bool = True
) -> tuple[dict, dict]:
    """Map a state dict in Meta's dinov3 layout (bare or prefixed keys) onto `DINOv3ViTModel` keys, the keys of
    `AlibiDinov3Model`; learned ALiBi slopes `blocks.N.attn.m` become `model.alibi.slopes`.

    Returns:
        `(state_dict, architecture)`; `architecture["rope_theta"]` only when the source has RoPE periods and
        `read_rope` (False: the RoPE is left out unread). Unmapped source keys raise `CheckpointKeyError` naming them;
        the training-only `local_cls_norm.*` is dropped with a logged warning naming its keys.
    """
    state_dict = strip_prefix(dict(state_dict))
    architecture = _dinov3_architecture(state_dict, num_heads, read_rope)
    hidden_size = architecture["hidden_size"]
    converted, unexpected, slopes, dropped = {}, [], {}, []
    for key, tensor in state_dict.items():
        block = re.match(r"blocks\.(\d+)\.(attn\.qkv\.(?:weight|bias|bias_mask)|attn\.m)$", key)
        renamed = next((re.sub(f"^{a}$", b, key) for a, b in DINOV3_RENAMES if re.fullmatch(a, key)), None)
        if renamed is not None:
            converted[renamed] = tensor.clone()
        elif key == "mask_token":
            converted["embeddings.mask_token"] = tensor.reshape(1, 1, hidden_size).clone()
        elif key == "rope_embed.periods":
            pass  # recomputed from `rope_theta`, checked against these periods
        elif key in DINOV3_TRAINING_ONLY_KEYS:
            dropped.append(key)
        elif block and block.group(2) == "attn.m":
            slopes[int(block.group(1))] = tensor.reshape(-1).clone()
        elif block:
            entries = _dinov3_attention_entries(*block.groups(), tensor, architecture["key_bias"])
            converted.update({name: part.clone() for name, part in entries.items()})
        else:
            unexpected.append(key)
    _finish_mapping(converted, unexpected, slopes, "dinov3", "model.alibi.slopes")
    if dropped:
        logger.warning(
            "Dropped %s: Meta's dinov3 uses this norm only on the CLS token of local crops in training; the model "
            "does not use it.",
            key_list(dropped),
        )
    converted.setdefault("embeddings.register_tokens", torch.zeros(1, 0, hidden_size))
    converted.setdefault("embeddings.mask_token", torch.zeros(1, 1, hidden_size))
    return converted, architecture


# Every DINOv2 size and all DINOv3 sizes but ViT-7B use 64-dimensional heads; Meta and timm state dicts do not store
# the head count (a dinov3 state dict with RoPE does: `rope_embed.periods` holds head_dim / 4 periods).
DINOV2_HEAD_DIM = 64


# Keys only Meta's dinov3 layout has; a dinov3 state dict without any of them (an ALiBi file with no registers and a
# plain MLP) still differs from a DINOv2 one by its mask token without a position embedding.
DINOV3_ONLY_KEYS = {"storage_tokens", "rope_embed.periods", "blocks.0.attn.qkv.bias_mask", "blocks.0.mlp.w1.weight"}


# Keys of Meta's dinov3 models trained with `untie_global_and_local_cls_norm` (ViT-7B/16, the SAT-493M ViT-L/16): a
# norm applied to the local crops' CLS token in training only, never at inference.
DINOV3_TRAINING_ONLY_KEYS = {"local_cls_norm.weight", "local_cls_norm.bias"}


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
