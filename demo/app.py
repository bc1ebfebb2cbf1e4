"""Side-by-side features of DINOv2 and ALiBi-DINOv2 on one micrograph, in the browser (Gradio), and scribble
segmentation with each model's features.

Features tab: for every model the PCA colours of the patch features, a k-means segmentation of the patches and
the positional probe: the held-out R^2 with which a linear map recovers each patch's column (x) and row (y) from
its features. Position-free features score near 0 (or below); stock DINOv2 scores high, and its PCA and k-means
maps show left-right and radial gradients on homogeneous material.

Segmentation tab: scribbles in 2 to 8 class colours train a segmenter per model (classical or classical + ViT
features, see `demo.segmentation_view`); the masks come back overlaid on the image, side by side, with the area
fraction of each class, and each model's segmenter and mask can be downloaded.

    pip install -e ".[eval,demo]"
    python -m demo.app --models facebook/dinov2-with-registers-small path/or/hub-id/of/an-alibi-model
    # offline, with the models the quickstart writes:
    python -m demo.app --models outputs/quickstart/teacher-synthetic outputs/quickstart/student-alibi

Images are pictures dropped on the page, or files (PNG, JPEG, TIFF of 8 or 16 bits) chosen in the file box.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from alibi_dinov2.cli import ArgumentParser, run_command
from alibi_dinov2.features.cache import FeatureCache
from alibi_dinov2.features.extraction import extract_patch_features, patch_size_of
from alibi_dinov2.features.preprocessing import DEFAULT_MAX_SIDE, shrink_to_max_side
from alibi_dinov2.features.visualisation import kmeans_map, labels_to_rgb, pca_rgb, to_uint8
from alibi_dinov2.io.images import load_image, to_rgb01
from alibi_dinov2.names import display_names
from demo import segmentation_view as segmentation
from evaluation.positional_probe import PROBE_PROTOCOL, R2_SCALE, describe_r2


logger = logging.getLogger("demo.app")


# The project's probe protocol on one sampling: about one patch in 36 fits the probe, the others score it.
DEMO_PROBE = replace(PROBE_PROTOCOL, holdout=True, repeats=1)
EDITOR_HEIGHT = 720  # px: the scribble editor spans the page's width
DEFAULT_FEATURE_CACHE_MB = 8192  # a 4096 x 4096 image's classical stack (3.9 GB) and two models' ViT channels


@dataclass
class FeatureAnalysis:
    """What one model's patch features show of one image; maps are per patch, on the `(h, w)` grid."""

    pca_rgb: np.ndarray  # (h, w, 3) float64 in [0, 1]: first three principal components as colours
    clusters: np.ndarray  # (h, w) int64 in [0, n_clusters): k-means labels of the standardised features
    position_r2: dict[str, float]  # {"x": R^2, "y": R^2} held out; NaN where the grid is too small to probe


def prepare_image(image, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """Any image (path, PIL, array; gray, RGB, RGBA, palette, 8-16 bit) -> `(H, W, 3)` float32 in [0, 1] by the
    project's one image policy, shrunk (anti-aliased) so that its longer side is at most `max_side` pixels.

    Raises:
        ImageReadError: not an image (the message names the shape); ValueError: `max_side < 1`.
    """
    return shrink_to_max_side(to_rgb01(image), max_side)


def position_r2(features: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Held-out R^2 of a linear probe from `(h, w, C)` features to the patch column (`x`) and row (`y`)."""
    protocol = replace(DEMO_PROBE, seed=seed)
    if not protocol.can_probe(*features.shape[:2]):
        return {"x": float("nan"), "y": float("nan")}
    probe = protocol.estimator("lr+ud").fit(features)
    x_r2, y_r2 = probe.score_per_ramp(features)
    return {"x": float(x_r2), "y": float(y_r2)}


def analyse_features(features: np.ndarray, n_clusters: int = 3, seed: int = 0) -> FeatureAnalysis:
    """PCA colours, k-means labels and positional R^2 of an `(h, w, C)` patch-feature grid."""
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must be an (h, w, C) grid, got shape {features.shape}")
    n_patches = features.shape[0] * features.shape[1]
    if not 2 <= n_clusters <= n_patches:
        raise ValueError(f"n_clusters must lie between 2 and the number of patches ({n_patches}), got {n_clusters}")
    return FeatureAnalysis(
        pca_rgb=pca_rgb(features),
        clusters=kmeans_map(features, n_clusters=n_clusters, seed=seed),
        position_r2=position_r2(features, seed=seed),
    )


def analyse_image(model, image: np.ndarray, n_clusters: int = 3, image_statistics=None, seed: int = 0):
    """`analyse_features` of the last-layer patch features of `model` on `image` (cropped to whole patches).

    Returns:
        `FeatureAnalysis` on the `(H // p, W // p)` patch grid.
    """
    features = extract_patch_features(model, image, image_statistics)
    return analyse_features(features, n_clusters=n_clusters, seed=seed)


def patches_to_pixels(patch_map: np.ndarray, patch_size: int) -> np.ndarray:
    """`(h, w[, ...])` per-patch map -> `(h * p, w * p[, ...])`, each patch a constant block (no smoothing, so the
    blocks show what the model resolves)."""
    return np.repeat(np.repeat(np.asarray(patch_map), patch_size, axis=0), patch_size, axis=1)


def render_comparison(
    models: Mapping[str, tuple[object, object]],
    image: np.ndarray,
    n_clusters: int = 3,
    max_side: int = DEFAULT_MAX_SIDE,
    seed: int = 0,
) -> tuple[list[tuple[np.ndarray, str]], list[list]]:
    """Everything the page shows for one image.

    Args:
        models: display name -> (model, image statistics or None), as `alibi_dinov2.hub.models.load_model` returns.
        image: grayscale or RGB image, any dtype.

    Returns:
        gallery: `(uint8 picture, caption)` pairs: the image as the models saw it, then per model its PCA colours
            and its k-means segmentation, upsampled to pixels.
        table: one row per model, `[name, "h x w", x R^2, y R^2, verdict]` (R^2 rounded to 3 decimals, NaN on
            grids too small to probe; the verdict in the report's words, from the mean of x and y).
    """
    rgb = prepare_image(image, max_side)
    gallery, table = [], []
    for index, (name, (model, statistics)) in enumerate(models.items()):
        patch_size = patch_size_of(model)
        analysis = analyse_image(model, rgb, n_clusters=n_clusters, image_statistics=statistics, seed=seed)
        height, width = analysis.clusters.shape
        if index == 0:
            gallery.append((to_uint8(rgb[: height * patch_size, : width * patch_size]),
                            input_caption(rgb.shape[:2], (height * patch_size, width * patch_size))))
        gallery.append((to_uint8(patches_to_pixels(analysis.pca_rgb, patch_size)), f"{name}: PCA"))
        segmentation = labels_to_rgb(analysis.clusters)
        gallery.append((to_uint8(patches_to_pixels(segmentation, patch_size)), f"{name}: k-means, k = {n_clusters}"))
        r2 = analysis.position_r2
        verdict = f"its features {describe_r2((r2['x'] + r2['y']) / 2)}"
        table.append([name, f"{height} x {width}", round(r2["x"], 3), round(r2["y"], 3), verdict])
    return gallery, table


def input_caption(size: tuple[int, int], kept: tuple[int, int]) -> str:
    """The input picture's caption: its size as the models saw it, and what the crop to whole patches left out
    (short: the gallery shows captions on one line)."""
    (height, width), (kept_h, kept_w) = size, kept
    if (kept_h, kept_w) == (height, width):
        return f"input {width}x{height} px"
    return f"input {kept_w}x{kept_h} of {width}x{height} px"


# What the features tab's pictures show; their captions stay short.
FEATURES_NOTE = (
    "Per model: the first three principal components of its patch features as colours (**PCA**) and a **k-means** "
    "clustering of them; colour gradients across the frame, bands or rings show position, not material. The input "
    "is cropped to whole patches (its caption gives the size kept, width x height)."
)


def user_error(gr, message: str):
    """A user's mistake (an unreadable file, a missing image, too few scribbles): one line in the server log and the
    message on the page, without a traceback."""
    logger.warning("refused: %s", message)
    return gr.Error(message, print_exception=False)


def launch_message(local_url: str, share_url: str | None, share: bool) -> str:
    """What the command prints once the page is served (Gradio's own lines are silenced: they speak of
    `launch(share=True)`, where this command has `--share`)."""
    if share_url:
        return f"Running on {local_url} and at the public link {share_url} (temporary: up to 1 week)"
    if share:
        return f"Running on {local_url}; no public link could be made (see above)"
    return f"Running on {local_url} (add --share for a public link)"


def read_upload(path: str) -> np.ndarray:
    """An uploaded file as a numpy image (first page of multi-page TIFFs); errors name the problem."""
    return load_image(path)


def sample_images() -> dict[str, np.ndarray]:
    """Images bundled with scikit-image (no download): homogeneous textures and a fluorescence micrograph."""
    from skimage import data

    from alibi_dinov2.io.image_sets import texture_images

    return {**dict(texture_images()), "cells (fluorescence)": data.cell()}


TABLE_HEADERS = ["model", "patch grid", "x R^2 (held out)", "y R^2 (held out)", "verdict"]


def build_demo(
    models: Mapping[str, tuple[object, object]],
    max_side: int = DEFAULT_MAX_SIDE,
    feature_cache_mb: int = DEFAULT_FEATURE_CACHE_MB,
    download_root: Path | None = None,
):
    """The Gradio page: a features tab (an image, the number of k-means clusters, the comparison) and a segmentation
    tab (an image with scribbles, the models and features to compare, the masks). The segmentation's files go to a
    folder per run under `download_root` (default: a temporary folder removed with the page), of which the newest
    `segmentation_view.KEPT_RUNS` stay; Gradio's copies of served files are removed after a day."""
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError('The demo needs Gradio: pip install -e ".[demo]"') from error

    samples = sample_images()
    downloads = None
    if download_root is None:
        downloads = tempfile.TemporaryDirectory(prefix="alibi-segmentation-")
        download_root = Path(downloads.name)

    def run(picture, upload, n_clusters):
        if upload is not None:
            picture = read_chosen_file(gr, upload)
        if picture is None:
            raise user_error(gr, "Drop an image on the page, choose a file, or pick one of the examples.")
        try:
            return render_comparison(models, picture, int(n_clusters), max_side)
        except (OSError, ValueError) as error:  # ImageReadError / ImageTooSmallError name the problem
            raise user_error(gr, str(error)) from None

    with gr.Blocks(title="ALiBi-DINOv2: features without position", delete_cache=(3600, 86400)) as page:
        gr.Markdown(
            "# ALiBi-DINOv2: patch features without positional bias\n"
            "Compare the patch features of stock DINOv2 and ALiBi-DINOv2 on your micrographs, and segment them "
            "from a few scribbles with each model's features."
        )
        with gr.Tabs():
            with gr.Tab("Features"):
                gr.Markdown(
                    "PCA colours and k-means clusters of each model's patch features, and how well a linear probe "
                    "recovers a patch's position (x, y) from them: near 0 means the features describe what a patch "
                    f"shows, not where it sits. Images are shrunk to {max_side} px on their longer side.\n\n"
                    + FEATURES_NOTE
                )
                with gr.Row():
                    with gr.Column(scale=1):
                        picture = gr.Image(label="image", type="numpy", image_mode="RGB")
                        upload = gr.File(label="or a file (PNG, JPEG, 8/16-bit TIFF)", type="filepath")
                        n_clusters = gr.Slider(2, 8, value=3, step=1, label="k-means clusters")
                        button = gr.Button("Compare", variant="primary")
                        examples = [[image] for image in samples.values()]
                        gr.Examples(examples=examples, inputs=[picture], label="examples")
                    with gr.Column(scale=2):
                        table = gr.Dataframe(headers=TABLE_HEADERS, label="positional probe", interactive=False)
                        gr.Markdown(f"{R2_SCALE}.")
                # The pictures across the page's width: large enough to judge, their captions on one line.
                gallery = gr.Gallery(label="features", columns=2 * len(models) + 1, object_fit="contain")
                button.click(run, inputs=[picture, upload, n_clusters], outputs=[gallery, table])
            with gr.Tab("Segmentation"):
                segmentation_tab(gr, models, FeatureCache(feature_cache_mb << 20), download_root)
    page.segmentation_downloads = downloads  # the temporary folder lives as long as the page
    return page


def read_chosen_file(gr, path: str | None):
    """`read_upload` of a chosen file (None for none), its errors as a message on the page naming the file."""
    try:
        return None if path is None else read_upload(path)
    except (OSError, ValueError) as error:
        raise user_error(gr, f"Could not read {path}: {error}") from None


def segmentation_tab(
    gr, models: Mapping[str, tuple[object, object]], feature_cache: FeatureCache, download_root: Path
) -> None:
    """The segmentation tab's components and events (thin wiring over `demo.segmentation_view`); each run's files
    in a new folder under `download_root`."""

    def show_file(path):
        return gr.skip() if path is None else segmentation.editor_value(read_chosen_file(gr, path))

    def segment(editor, upload, chosen, feature_set, mask_format, progress=gr.Progress()):
        editor = editor or {"background": None, "layers": []}
        chosen_image = read_chosen_file(gr, upload)
        try:
            image = segmentation.image_to_segment(editor["background"], chosen_image, upload and Path(upload).name)
            gallery, headers, rows, files = segmentation.run_segmentation(
                image, editor["layers"], {name: models[name] for name in chosen or []}, feature_set,
                segmentation.new_run_folder(download_root), mask_format, feature_cache,
                lambda fraction, text: progress(fraction, desc=text),
            )
        except (OSError, ValueError) as error:  # what is wrong with the image or the scribbles, and what to do
            raise user_error(gr, str(error)) from None
        return gallery, {"headers": headers, "data": rows}, [str(path) for path in files]

    gr.Markdown(
        "Draw scribbles on the micrograph with the brush, in 2 to 8 colours, one colour per class; each model's "
        "features train a classifier (XGBoost) on the scribbled pixels, which labels every pixel of the full-size "
        "image. Features are computed once per image, model and feature set, so adding scribbles and running again "
        "is quick. The brush's colours, in the palette's order, are the classes:"
    )
    gr.HTML(segmentation.legend_html())
    editor = gr.ImageEditor(
        label="image and scribbles", type="numpy", image_mode="RGBA", format="png", transforms=(),
        sources=("upload", "clipboard"), layers=False, eraser=gr.Eraser(default_size=segmentation.BRUSH_SIZE * 3),
        brush=gr.Brush(default_size=segmentation.BRUSH_SIZE, colors=segmentation.hex_colours(),
                       default_color=segmentation.hex_colours()[0], color_mode="fixed"),
        height=EDITOR_HEIGHT, canvas_size=(segmentation.EDITOR_MAX_SIDE, segmentation.EDITOR_MAX_SIDE),
    )
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="or a file, segmented in full precision (PNG, JPEG, 8/16-bit TIFF)",
                             type="filepath")
            chosen = gr.CheckboxGroup(list(models), value=list(models), label="models")
            feature_set = gr.Radio(list(segmentation.FEATURE_SETS), value="classical+vit", label="features",
                                   info="classical: the Weka-style stack alone, the same for every model")
            mask_format = gr.Radio(list(segmentation.MASK_FORMATS), value="PNG", label="mask file")
            button = gr.Button("Segment", variant="primary")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="segmentations", columns=max(len(models), 1), object_fit="contain",
                                 format="png")
            table = gr.Dataframe(headers=segmentation.table_headers([1, 2]), label="area fraction of each class",
                                 interactive=False)
            files = gr.File(label="downloads: segmenter (for alibi-segment apply) and mask per model",
                            file_count="multiple")
    upload.upload(show_file, inputs=[upload], outputs=[editor])
    button.click(segment, inputs=[editor, upload, chosen, feature_set, mask_format], outputs=[gallery, table, files],
                 api_name="segment")


@dataclass
class DemoArguments:
    """Models and serving of ``python -m demo.app``."""

    models: list[str] = field(metadata={"help": "Hub ids or model folders (trust_remote_code)"})
    names: list[str] | None = field(default=None, metadata={"help": "display names, one per model (default: the last "
                                                                  "part of each path or Hub id)"})
    device: str | None = field(default=None, metadata={"help": "e.g. cuda; default: CPU"})
    max_side: int = field(
        default=DEFAULT_MAX_SIDE,
        metadata={"help": "features tab: shrink images to this longer side (pixels); segmentation runs at full size"},
    )
    feature_cache_mb: int = field(default=DEFAULT_FEATURE_CACHE_MB, metadata={"help": "memory kept for the features "
                                                                              "of recent images (MiB)"})
    port: int = field(default=7860, metadata={"help": "port of the page on 127.0.0.1"})
    share: bool = field(default=False, metadata={"help": "also serve through a public Gradio link"})

    def __post_init__(self):
        display_names(self.models, self.names)
        if self.max_side < 1:
            raise ValueError(f"--max_side must be a positive number of pixels, got {self.max_side}")
        if self.feature_cache_mb < 0:
            raise ValueError(f"--feature_cache_mb must be 0 or more, got {self.feature_cache_mb}")


def build_parser() -> ArgumentParser:
    """The command-line parser over [`DemoArguments`]."""
    return ArgumentParser(DemoArguments, prog="python -m demo.app", description=__doc__.split("\n\n")[0])


def parse_args(argv: Sequence[str] | None = None) -> DemoArguments:
    (args,) = build_parser().parse(argv)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from alibi_dinov2.hub.models import load_model

    args = parse_args(argv)
    names = display_names(args.models, args.names)
    models = {name: load_model(source, args.device) for name, source in zip(names, args.models)}
    page = build_demo(models, args.max_side, args.feature_cache_mb)
    page.launch(server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True)
    print(launch_message(page.local_url, page.share_url, args.share), flush=True)
    page.block_thread()


if __name__ == "__main__":
    run_command(main)
