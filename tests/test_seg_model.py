"""Mobile DeepLabv3: shapes, the paper's params / MAdds (Table 7), inference (single vs MF)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from backbone.complexity import count_madds, count_params
from backbone.errors import ArgumentError
from mnv2seg.deeplabv3 import DeepLabV3
from mnv2seg.inference import DEFAULT_MF_SCALES, predict, predict_probs


@pytest.mark.parametrize("output_stride,rates", [(8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))])
@pytest.mark.parametrize("head", ["lite", "aspp"])
def test_shapes_at_every_output_stride(output_stride, rates, head):
    model = DeepLabV3(5, {"output_stride": output_stride}, head=head).eval()
    assert model.output_stride == output_stride
    assert model.atrous_rates == rates
    x = torch.randn(2, 3, 67, 45)  # odd, non-square: the logits still come back at the input size
    with torch.no_grad():
        feat = model.backbone(x)["layer_18"]
        out = model(x)
    assert feat.shape == (2, 320, -(-67 // output_stride), -(-45 // output_stride))
    assert out.shape == (2, 5, 67, 45)
    if head == "aspp":
        dilations = [b[0].dilation[0] for b in model.head.branches[2:]]
        assert tuple(dilations) == rates


def test_layer_19_feature_uses_the_1280_conv():
    model = DeepLabV3(3, {"output_stride": 16}, feature="layer_19")
    assert model.backbone.out_channels["layer_19"] == 1280
    assert model.head.branches[1][0].in_channels == 1280


# Table 7 (MNet V2*, 21 classes, 513x513, OS16): lite 2.11M params / 2.75B MAdds, ASPP 4.52M params.
# TARGETS.md measured a reference at 2.114M / 2.741B and 4.524M / 5.364B (the paper's 5.8B ASPP
# MAdds is not reproduced by any plain/separable ASPP variant; we check params, and MAdds against
# the reference measurement).
@pytest.mark.parametrize("head,params,madds", [("lite", 2.11e6, 2.75e9), ("aspp", 4.52e6, 5.364e9)])
def test_params_and_madds_match_table_7(head, params, madds):
    model = DeepLabV3(21, {"output_stride": 16, "pretrained": "none"}, head=head)
    n = count_params(model)
    assert abs(n - params) / params < 0.01, n
    m = count_madds(model, (1, 3, 513, 513))
    assert abs(m - madds) / madds < 0.03, m


def test_no_1280_conv_in_mnet_v2_star():
    model = DeepLabV3(21, {"output_stride": 16}, head="lite")
    assert not any(isinstance(m, nn.Conv2d) and m.out_channels == 1280 for m in model.modules())


def test_bad_config_raises_config_error_naming_the_key():
    with pytest.raises(ArgumentError, match="^head "):
        DeepLabV3(21, {}, head="psp")
    with pytest.raises(ArgumentError, match="^feature "):
        DeepLabV3(21, {}, feature="layer_12")
    with pytest.raises(ArgumentError, match="^num_classes "):
        DeepLabV3(1, {})


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = DeepLabV3(4, {"output_stride": 16}, head="lite").eval()
    # random BN statistics so the network is not trivially flat
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    nn.init.normal_(model.head.classifier.weight, std=1.0)  # confident, spatially varying outputs
    return model


def test_mf_with_one_scale_and_no_flip_equals_single_scale_exactly(small_model):
    x = torch.randn(2, 3, 49, 61)
    single = predict(small_model, x, "single")
    mf = predict_probs(small_model, x, scales=(1.0,), flip=False)
    assert torch.equal(single, mf)
    with torch.no_grad():
        assert torch.equal(single, small_model(x).float().softmax(1))


def test_mf_averages_probabilities_over_scales_and_flips(small_model):
    F = nn.functional
    x = torch.randn(1, 3, 40, 56)
    probs = predict(small_model, x, "mf", scales=(0.5, 1.5), flip=True)
    assert probs.shape == (1, 4, 40, 56)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 40, 56))
    # DeepLab's MF: logits of each resized (and flipped) input, resized back, softmax, then the mean
    runs = []
    with torch.no_grad():
        for s in (0.5, 1.5):
            for f in (False, True):
                xi = x.flip(-1) if f else x
                xi = F.interpolate(xi, size=(round(40 * s), round(56 * s)), mode="bilinear")
                p = F.interpolate(small_model(xi), size=(40, 56), mode="bilinear").softmax(1)
                runs.append(p.flip(-1) if f else p)
    torch.testing.assert_close(probs, torch.stack(runs).mean(0))
    assert not torch.allclose(probs, predict(small_model, x, "single"), atol=1e-3)


def _random_bn_model(align_corners: bool) -> DeepLabV3:
    torch.manual_seed(0)
    model = DeepLabV3(4, {"output_stride": 16}, head="lite", align_corners=align_corners).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    nn.init.normal_(model.head.classifier.weight, std=1.0)
    return model


def _lowres_logits(model: DeepLabV3, x: torch.Tensor) -> torch.Tensor:
    return model.head(model.backbone(x)[model.feature])


def test_align_corners_puts_the_corner_logits_on_the_corner_pixels():
    """TF upsamples with align_corners=True on 16k+1 inputs: feature j lands on pixel 16 j, corners on corners."""
    x = torch.randn(2, 3, 65, 81)  # 16*4+1 x 16*5+1
    model = _random_bn_model(align_corners=True)
    with torch.no_grad():
        low, out = _lowres_logits(model, x), model(x)
    assert low.shape[-2:] == (5, 6) and out.shape[-2:] == (65, 81)
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        torch.testing.assert_close(out[..., i, j], low[..., i, j], rtol=0, atol=1e-5)
    # every feature sits on its pixel, not just the corners
    torch.testing.assert_close(out[..., ::16, ::16], low, rtol=0, atol=1e-5)
    with torch.no_grad():  # PyTorch's default (half-pixel centres; its corners are clamped, so equal too) does not
        off = _random_bn_model(align_corners=False)(x)
    assert (off[..., ::16, ::16] - low).abs().max() > 1e-2


def test_mf_with_align_corners_resizes_as_tf_deeplab():
    """TF's multi_scale_logits + predict_labels_multi_scale: image resized to scale_dimension(d, s) =
    int((d - 1) s + 1) with align_corners=True, low-res logits to scale_dimension(d, max(1, s) / 16), then to
    the image, both with align_corners=True; softmax; mean over scales and flips. On 65 (16*4+1) every
    scaled size of the default scales is 16k+1 (as on 513), where the model's own upsampling first changes
    nothing."""
    F = nn.functional
    model = _random_bn_model(align_corners=True)
    x = torch.randn(1, 3, 65, 65)

    def dim(d: int, s: float) -> int:
        return int((d - 1) * s + 1)

    def resize(t: torch.Tensor, size: int) -> torch.Tensor:
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=True)

    runs = []
    with torch.no_grad():
        for s in DEFAULT_MF_SCALES:
            for flipped in (False, True):
                xi = x.flip(-1) if flipped else x
                low = _lowres_logits(model, xi if s == 1.0 else resize(xi, dim(65, s)))
                logits = resize(resize(low, dim(65, max(1.0, s) / 16)), 65)
                runs.append((logits.flip(-1) if flipped else logits).softmax(1))
    tf_probs = torch.stack(runs).mean(0)
    ours = predict(model, x, "mf")  # align_corners from the model
    torch.testing.assert_close(ours, tf_probs, rtol=0, atol=1e-5)
    assert not torch.allclose(predict(model, x, "mf", align_corners=False), tf_probs, atol=1e-3)


def test_flip_averaging_is_exact_for_a_flip_equivariant_model():
    conv = nn.Conv2d(3, 4, 1)  # per-pixel model: flipping commutes with it
    x = torch.randn(2, 3, 9, 13)
    torch.testing.assert_close(predict_probs(conv, x, (1.0,), flip=True), predict_probs(conv, x, (1.0,), flip=False))


def test_predict_rejects_bad_mode():
    with pytest.raises(ValueError, match="inference mode"):
        predict(nn.Conv2d(3, 2, 1), torch.randn(1, 3, 4, 4), "tta")
