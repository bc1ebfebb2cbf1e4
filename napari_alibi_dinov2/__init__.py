"""napari plugin: scribble segmentation on ALiBi-DINOv2 / ALiBi-DINOv3 features (the dock widget, the segmenter
file's reader and writer) and those models as Convpaint feature extractors. The logic lives in the library,
:mod:`alibi_dinov2.segmentation.interactive`; this package is its user interface."""
