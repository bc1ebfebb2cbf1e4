"""Feature models loaded by name (a folder or a Hub id) with the image statistics stored beside them."""

from __future__ import annotations

import importlib

from alibi_dinov2.features.preprocessing import image_statistics, stored_image_processor
from alibi_dinov2.hub.sources import check_model_source


def load_model(name: str, device: str | None = None):
    """``AutoModel.from_pretrained(name, trust_remote_code=True)`` in eval mode, and its image statistics.

    Returns:
        (model, image_processor_stats): the stats are a dict with ``image_mean`` / ``image_std`` from the
        model's image processor when one is stored with it, else None (ImageNet statistics are used).

    Raises:
        SourceNotFoundError: `name` is neither a file, a folder nor a Hub id (checked before any Hub call).
    """
    from transformers import AutoModel

    name = check_model_source(name)

    # Registers alibi_dinov2 and alibi_dinov3 with the Auto classes, for local folders saved without remote code.
    for module in ("modeling_alibi_dinov2", "modeling_alibi_dinov3"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    model = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
    if device is not None:
        model = model.to(device)
    processor = stored_image_processor(name, trust_remote_code=True)
    if processor is None:  # no preprocessor_config.json (e.g. a converted folder): ImageNet statistics
        return model, None
    mean, std = image_statistics(processor)
    return model, {"image_mean": mean.tolist(), "image_std": std.tolist()}
