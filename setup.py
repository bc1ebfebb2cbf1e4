"""alibi-dinov2: DINOv2 features without positional bias, through a 2D ALiBi attention bias."""

from pathlib import Path

from setuptools import find_packages, setup


HERE = Path(__file__).parent

# Install torch first (`pip install torch==2.13.0` for the CPU build): a bare `torch` requirement that pip must
# resolve by itself may pull a CUDA build of several GB.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "huggingface_hub>=1.0",
    "numpy>=1.24",
    "pillow>=10.0",
    "tqdm>=4.66",
]
EXTRAS = {
    # The positional probe logged during training and `--blank_channels auto` need scikit-learn and scipy.
    "train": [
        "accelerate>=1.0",
        "datasets>=3.0",
        "tensorboard>=2.15",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "pyyaml>=6.0",
    ],
    "eval": [
        "scikit-learn>=1.4",
        "scikit-image>=0.22",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tifffile>=2023.1",
        "xgboost>=2.0",
        "skops>=0.10",
        # Block-wise segmentation of images larger than memory.
        "dask[array]>=2024.1",
        "distributed>=2024.1",  # --scheduler: blocks on a dask.distributed cluster
        "zarr>=3.0",  # OME-Zarr (NGFF 0.4) masks are written through its zarr-format-2 groups
    ],
    "demo": ["gradio>=4.0"],
    # Optional dense-CRF post-processing of the trainable segmenter (compiles C++ on install).
    "crf": ["pydensecrf2>=1.1"],
}
CONSOLE_SCRIPTS = [
    f"alibi-{name.replace('_', '-')} = alibi_dinov2.commands:{name}"
    for name in ("convert", "distill", "quickstart", "probe", "report", "scribbles", "linear_seg", "segment", "demo",
                 "publish")
]
# The napari plugin (napari_alibi_dinov2: the dock widget, the segmenter file's reader and writer, Convpaint
# extractors) with a Qt binding (PyQt6: napari 0.9 deprecates PyQt5). Convpaint is optional: `pip install
# napari-convpaint`.
EXTRAS["napari"] = ["napari>=0.5", "npe2>=0.7", "magicgui>=0.8", "qtpy>=2.0", "PyQt6>=6.5"]
# ONNX export tests: both exporters (`dynamo=True` needs onnxscript) and onnxruntime to run the files.
EXTRAS["onnx"] = ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"]
EXTRAS["dev"] = sorted(
    {*EXTRAS["train"], *EXTRAS["eval"], *EXTRAS["demo"], *EXTRAS["onnx"], *EXTRAS["napari"], "pytest>=8.0",
     "ruff>=0.6", "pytest-qt>=4.4", "pytest-xvfb>=3.0"}
)

setup(
    name="alibi-dinov2",
    version="0.1.0",
    description="DINOv2 for transformers with a 2D ALiBi attention bias instead of a learned position embedding",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=[
        "alibi_attention",
        "configuration_alibi_dinov2",
        "modeling_alibi_dinov2",
        "configuration_alibi_dinov3",
        "modeling_alibi_dinov3",
        "convert_checkpoint",
        "train_distill",
        "quickstart",
    ],
    packages=find_packages(
        include=["alibi_dinov2", "alibi_dinov2.*", "evaluation", "evaluation.*", "demo", "napari_alibi_dinov2"]
    ),
    package_data={"napari_alibi_dinov2": ["napari.yaml"]},
    install_requires=INSTALL_REQUIRES,
    # One console command per entry point (`alibi-convert`, `alibi-distill`, ...): see alibi_dinov2/commands.py.
    # napari finds the plugin (its dock widget, reader and writer) through its npe2 manifest.
    entry_points={
        "console_scripts": CONSOLE_SCRIPTS,
        "napari.manifest": ["alibi-dinov2 = napari_alibi_dinov2:napari.yaml"],
    },
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Framework :: napari",
    ],
)
