"""The inference-only fast paths give the training network's values: BatchNorm folding
(backbone.fuse), the in-place ReLU6 without a saved copy (backbone.layers), Mobile DeepLab's eval
layout, and the process runtime settings (backbone.runtime)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from backbone.errors import ConfigError
from backbone.fuse import InferenceCopy, fold_batchnorm
from backbone.layers import ConvBNAct, ReLU6
from backbone.padding import Conv2dSame
from mnv2det.ssdlite import SSDLite
from mnv2seg.deeplabv3 import DeepLabV3


def _with_bn_statistics(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (init has weight 1, bias 0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype)
            m.momentum = 1.0  # the running stats become those of a larger batch like x
    model.train()
    with torch.no_grad():
        model(torch.cat([x, torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randn(x.shape, generator=g, dtype=x.dtype)]))
    return model.eval()


def _assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to rounding relative to the tensor's scale (float64: folding is exact algebra; in
    float32 the 1x1 maps' tiny running variances amplify rounding too much for a tight check)."""
    tol = 1e-9 * float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("padding", ["torch", "tf"])
def test_folded_detector_equals_unfolded(padding: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    model = SSDLite(num_classes=3, image_size=96, backbone={"width_mult": 0.35, "padding": padding}).double()
    model = _with_bn_statistics(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert _bn_count(folded) == 0 and _bn_count(model) > 0
    if padding == "tf":
        assert any(isinstance(m, Conv2dSame) for m in folded.modules())
    with torch.no_grad():
        ref, out = model(x), folded(x)
    for key in ref:
        _assert_close_to_scale(out[key], ref[key])
    for k, v in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(v, before[k]), k
    sizes = torch.full((2, 2), 96)
    with torch.no_grad():
        d_ref, d_out = model.postprocess(ref, sizes), folded.postprocess(out, sizes)
    for a, b in zip(d_ref, d_out):  # the same detections
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"])


@pytest.mark.parametrize("head", ["lite", "aspp"])
def test_folded_segmenter_equals_unfolded(head: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 65, 65, dtype=torch.float64)
    model = _with_bn_statistics(DeepLabV3(4, backbone={"width_mult": 0.35}, head=head).double(), x)
    folded = fold_batchnorm(model)
    assert _bn_count(folded) == 0
    with torch.no_grad():
        ref, out = model(x), folded(x)
    _assert_close_to_scale(out, ref)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree > 0.999, agree


def test_a_batchnorm_not_after_a_conv_is_left_alone() -> None:
    seq = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))  # BN first: nothing to fold into
    folded = fold_batchnorm(seq)
    assert isinstance(folded[0], nn.BatchNorm2d)


def test_inference_copy_follows_the_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ConvBNAct(3, 4, 3), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    copy = InferenceCopy()
    first = copy.get(model)
    assert copy.get(model) is first  # unchanged weights: cached
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(x).sum().backward()  # train-mode forward also moves the running stats
    opt.step()
    second = copy.get(model)
    assert second is not first
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(x), model(x), rtol=1e-5, atol=1e-5)
    state = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    third = copy.get(model)
    assert third is not second
    with torch.no_grad():
        torch.testing.assert_close(third(x), model(x), rtol=1e-5, atol=1e-5)


def test_module_inference_model_is_folded_and_not_saved() -> None:
    from mnv2det.lightning_module import SSDLiteModule

    module = SSDLiteModule(num_classes=2, image_size=64, backbone={"width_mult": 0.35, "pretrained": "none"})
    net = module.inference_model()
    assert _bn_count(net) == 0 and not net.training
    assert all(not k.startswith("_inference") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.model.parameters())


def test_relu6_values_and_gradients_equal_torch() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.cat([torch.randn(4000, generator=g) * 5, torch.tensor([0.0, 6.0, -0.0, 5.999999, 6.000001])])
    grad = torch.randn(base.shape, generator=g)
    outs = []
    for act in (ReLU6(inplace=True), nn.ReLU6(inplace=True)):
        x = base.clone().requires_grad_()
        y = act(x * 1.0)  # a non-leaf, as after a BatchNorm
        y.backward(grad)
        outs.append((y.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_relu6_saves_no_copy_of_its_input() -> None:
    block = ConvBNAct(8, 16, 1).train()
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with torch.profiler.profile() as prof:
        block(x).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::clone" not in names, names


def test_deeplab_logits_layout_follows_mode() -> None:
    model = DeepLabV3(3, backbone={"width_mult": 0.35}, memory_format="channels_last")
    x = torch.randn(2, 3, 33, 33)
    out_train = model.train()(x)
    assert out_train.is_contiguous()  # what cross-entropy reads fastest
    with torch.no_grad():
        out_eval = model.eval()(x)
    assert out_eval.is_contiguous(memory_format=torch.channels_last)  # what argmax reads fastest
    assert torch.equal(out_eval.argmax(1), out_eval.contiguous().argmax(1))


def test_runtime_rejects_unknown_allocator() -> None:
    from backbone.runtime import apply_runtime

    assert apply_runtime(None) == {}
    with pytest.raises(ConfigError, match="runtime.cpu_allocator"):
        apply_runtime({"cpu_allocator": "jemalloc"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_runtime_tunes_glibc_malloc_in_a_fresh_process() -> None:
    code = ("import platform; from backbone.runtime import apply_runtime, applied; "
            "print(platform.libc_ver()[0], applied()['cpu_allocator'], "
            "apply_runtime({'cpu_allocator': 'tuned'})['cpu_allocator'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "default"
    assert out[2] == ("tuned" if out[0] == "glibc" else "default")
