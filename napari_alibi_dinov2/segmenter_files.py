"""The segmenter file (the safe zip of :mod:`alibi_dinov2.segmentation.segmenter_file`) as napari's reader and
writer contributions: opening one loads it into the dock widget, saving a segmentation layer as ``.zip`` writes the
segmenter that made it."""

from __future__ import annotations

import os
from typing import Callable, Optional

from alibi_dinov2.errors import InputError
from alibi_dinov2.segmentation.segmenter_file import read_segmenter


PLUGIN = "alibi-dinov2"  # npe2 names a plugin after its distribution
WIDGET = "Scribble segmentation"


def get_reader(path) -> Optional[Callable]:
    """The reader of a segmenter file, or None for any other path (napari then asks its other readers)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".zip"):
        return None
    try:
        read_segmenter(path)
    except (InputError, OSError):
        return None
    return read_segmenter_file


def read_segmenter_file(path) -> list[tuple]:
    """Load the segmenter into the viewer's dock widget (opened if needed); it adds no layer (napari's ``[(None,)]``).
    A segmenter whose model cannot be loaded is said in the notification area."""
    import napari
    from napari.utils.notifications import show_error

    viewer = napari.current_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    try:
        widget.load_segmenter(path)
    except (ValueError, OSError) as error:
        show_error(str(error))
    return [(None,)]


def write_segmenter(path: str, data, attributes: dict) -> list[str]:
    """Write the segmenter that made a segmentation layer (``File > Save Selected Layers...``, ``.zip``).

    Raises:
        ValueError: the layer was not made by the dock widget.
    """
    from napari_alibi_dinov2.widget import SEGMENTER_KEY

    segmenter = (attributes.get("metadata") or {}).get(SEGMENTER_KEY)
    if segmenter is None:
        raise ValueError(f"The layer {attributes.get('name')!r} holds no segmenter: save the segmentation layer that "
                         "the Scribble segmentation widget made")
    segmenter.save(path)
    return [path]
