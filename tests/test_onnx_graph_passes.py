"""The ONNX graph passes that make our files readable by OpenCV 4's ``cv2.dnn`` (backbone/export/onnx.py) keep
ONNX Runtime's function: on small hand-built graphs, in well under a second (tests/test_export_opencv.py runs
the exported models themselves in OpenCV 4).

- :func:`constant_resize_scales`: a Resize with ``sizes = Concat(Shape(x)[0:2], [h, w])`` (the exporter's
  form with a dynamic batch, which OpenCV 4 refuses) gets constant scales; the output size is h x w both
  in the run and in ONNX Runtime's shape inference (which multiplies in float64).
- :func:`center_tap_convs`: a Conv of a 1x1 input keeps only the tap that meets it (OpenCV 4.10 / 4.14
  compute a depthwise 3x3 Conv of a 1x1 input wrong), exactly the same function.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from backbone.export.onnx import center_tap_convs, constant_resize_scales  # noqa: E402
from backbone.training import downloads  # noqa: E402


def _model(nodes, inputs, outputs, inits) -> "onnx.ModelProto":
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x: np.ndarray) -> tuple[np.ndarray, list]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0], sess.get_outputs()[0].shape


def _resize_model(C: int, H: int, out: int, mode: str) -> "onnx.ModelProto":
    nodes = [helper.make_node("Shape", ["x"], ["nc"], start=0, end=2),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                              coordinate_transformation_mode=mode)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, H, H])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C, out, out])],
                  {"hw": np.array([out, out], np.int64)})


@pytest.mark.parametrize("H,out,mode,tol", [(23, 353, "align_corners", 0.0), (33, 513, "align_corners", 0.0),
                                            (7, 97, "align_corners", 0.0), (11, 161, "align_corners", 0.0),
                                            (20, 320, "half_pixel", 1e-4), (6, 97, "pytorch_half_pixel", 1e-4)])
def test_constant_resize_scales(H, out, mode, tol):
    x = np.random.default_rng(0).normal(size=(2, 3, H, H)).astype(np.float32)
    before, _ = _run(_resize_model(3, H, out, mode), x)
    model = constant_resize_scales(_resize_model(3, H, out, mode))
    assert {n.op_type for n in model.graph.node} >= {"Resize"}
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert len(resize.input) == 3 and resize.input[2]  # constant scales, no sizes
    after, declared = _run(model, x)
    assert after.shape == (2, 3, out, out) and list(declared[1:]) == [3, out, out]  # ORT's inference agrees
    assert np.abs(after - before).max() <= tol


def _conv_model(C: int, HW: int, group: int, pads: list[int], kernel: int = 3) -> tuple["onnx.ModelProto", int]:
    rng = np.random.default_rng(C + HW + group)
    out = (HW + pads[0] + pads[2] - kernel) + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, pads=pads,
                              kernel_shape=[kernel, kernel])]
    inits = {"w": rng.normal(size=(C, C // group, kernel, kernel)).astype(np.float32),
             "b": rng.normal(size=C).astype(np.float32)}
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, HW, HW])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C, out, out])], inits), out


@pytest.mark.parametrize("C,group,pads", [(128, 128, [1, 1, 1, 1]), (4, 4, [1, 1, 1, 1]), (8, 1, [1, 1, 1, 1]),
                                          (8, 8, [0, 0, 2, 2]), (8, 8, [2, 2, 0, 0])])
def test_center_tap_convs_exact(C, group, pads):
    x = np.random.default_rng(1).normal(size=(3, C, 1, 1)).astype(np.float32)
    before, _ = _run(_conv_model(C, 1, group, pads)[0], x)
    model = center_tap_convs(_conv_model(C, 1, group, pads)[0])
    conv = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [1, 1] and "pads" not in attrs
    assert [i.name for i in model.graph.initializer if i.name == "w"] == []  # the 3x3 weights are gone
    after, _ = _run(model, x)
    assert np.array_equal(after, before)


def test_center_tap_convs_leaves_larger_inputs():
    model, _ = _conv_model(8, 2, 8, [1, 1, 1, 1])
    assert center_tap_convs(model).graph.node[0].input[1] == "w"


OPENCV4_CHECK = r'''
import sys, numpy as np, cv2
assert cv2.__version__.startswith("4."), cv2.__version__
net = cv2.dnn.readNetFromONNX(sys.argv[1])
net.setInput(np.load(sys.argv[2]))
np.save(sys.argv[3], net.forward())
'''


def test_center_tap_convs_opencv4(tmp_path):
    """OpenCV 4 computes the rewritten depthwise Conv of a 1x1 input as ONNX Runtime does (the 3x3 one it
    gets wrong: SSDLite's last head level)."""
    cv4 = downloads.opencv4_dir()
    if not (cv4 / "cv2" / "__init__.py").is_file():
        msg = f"OpenCV 4 not installed at {cv4}; install it with `{downloads.FETCH_TEST_ASSETS}`"
        if os.environ.get("MNV2_REQUIRE_ASSETS", "") == "1":
            pytest.fail(msg + " (MNV2_REQUIRE_ASSETS=1)", pytrace=False)
        pytest.skip(msg)
    model, _ = _conv_model(128, 1, 128, [1, 1, 1, 1])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # OpenCV 4 wants static shapes here
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = center_tap_convs(model)
    x = np.random.default_rng(2).normal(size=(1, 128, 1, 1)).astype(np.float32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cv4), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", OPENCV4_CHECK, str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "y.npy") - _run(model, x)[0]).max() < 1e-5
