"""Scribble-trained (ilastik-like) segmentation: feature extractors, the segmenter, its safe file and the
`alibi-segment` command."""
