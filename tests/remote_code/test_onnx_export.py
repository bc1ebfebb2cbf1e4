"""ONNX export of AlibiDinov2Model, with both of PyTorch's exporters, run in onnxruntime against eager."""

import warnings

import pytest
import torch

from configuration_alibi_dinov2 import AlibiDinov2Config
from modeling_alibi_dinov2 import AlibiDinov2Model


onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[dev])")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (pip install -e .[dev])")

pytestmark = pytest.mark.compile

PATCH = 14
EXPORT_SIZE = (56, 70)  # a 4 x 5 grid
# Other grids served by the same file: taller, narrower, and a single row of patches.
OTHER_SIZES = [(28, 42), (98, 28), (14, 84)]


def pixel_values(height, width, seed=1):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def export_onnx(model, path, dynamo: bool) -> None:
    """One ONNX file whose image height and width are free (the batch too, with the legacy exporter)."""
    names = dict(input_names=["pixel_values"], output_names=["last_hidden_state", "pooler_output"])
    example = (pixel_values(*EXPORT_SIZE),)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and the tracer's shape-check warnings
        if dynamo:
            height, width = torch.export.Dim("height", min=1, max=64), torch.export.Dim("width", min=1, max=64)
            dynamic_shapes = ({2: PATCH * height, 3: PATCH * width},)
            torch.onnx.export(
                model, example, str(path), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, **names
            )
        else:
            axes = {
                "pixel_values": {0: "batch", 2: "height", 3: "width"},
                "last_hidden_state": {0: "batch", 1: "tokens"},
            }
            torch.onnx.export(model, example, str(path), dynamo=False, dynamic_axes=axes, opset_version=17, **names)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["legacy", "dynamo"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(alibi_slopes="learned"), dict(alibi_metric="manhattan", alibi_wrap=False)],
    ids=["constant", "learned", "manhattan-unwrapped"],
)
def test_one_onnx_file_serves_several_image_sizes_like_eager(tiny_kwargs, tmp_path, dynamo, options):
    """The bias is computed in the graph from the image size: a bias frozen at the export size would fail or differ
    at every other size."""
    torch.manual_seed(0)
    model = AlibiDinov2Model(AlibiDinov2Config(**tiny_kwargs, **options)).eval()
    if model.encoder.alibi.slopes is not None:
        with torch.no_grad():
            model.encoder.alibi.slopes.uniform_(0.5, 2.0)  # slopes that differ per layer and head
    path = tmp_path / "model.onnx"
    export_onnx(model, path, dynamo)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, size in enumerate([EXPORT_SIZE, *OTHER_SIZES]):
        inputs = pixel_values(*size, seed=seed)
        with torch.no_grad():
            expected = model(inputs).last_hidden_state
        (last_hidden_state, _) = session.run(None, {"pixel_values": inputs.numpy()})
        torch.testing.assert_close(torch.from_numpy(last_hidden_state), expected, atol=1e-4, rtol=0)
