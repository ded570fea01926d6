"""backbone.image_io.decode_image: every odd file repaired with a tag, every broken one refused."""
from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from backbone.errors import DataError
from backbone.image_io import UnreadableImage, apply_orientation, decode_image, oriented_size


def _rgb(h: int = 6, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_plain_rgb_is_exact_and_untagged(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    d = decode_image(tmp_path / "a.png")
    assert d.pixels.dtype == np.uint8 and d.pixels.shape == (6, 10, 3) and d.pixels.flags.c_contiguous
    np.testing.assert_array_equal(d.pixels, a)
    assert d.conversions == () and d.stored_size == (6, 10) and d.orientation == 1


def test_jpeg_rgb(tmp_path):
    Image.fromarray(_rgb(16, 24)).save(tmp_path / "a.jpg", quality=95)
    d = decode_image(tmp_path / "a.jpg")
    assert d.pixels.shape == (16, 24, 3) and d.conversions == ()


def test_grayscale_modes(tmp_path):
    g = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(g, "L").save(tmp_path / "l.png")
    d = decode_image(tmp_path / "l.png")
    assert d.conversions == ("grayscale",)
    np.testing.assert_array_equal(d.pixels, np.repeat(g[..., None], 3, 2))
    Image.fromarray(g > 100).convert("1").save(tmp_path / "b.png")
    d = decode_image(tmp_path / "b.png")
    assert d.conversions == ("grayscale",) and set(np.unique(d.pixels)) <= {0, 255}


def test_16bit_gray_png_is_scaled_not_white(tmp_path):
    v = np.linspace(0, 65535, 60).astype(np.uint16).reshape(6, 10)
    Image.fromarray(v).save(tmp_path / "g16.png")  # mode I;16
    with Image.open(tmp_path / "g16.png") as im:  # the defect: convert("RGB") clips (nearly) all to white
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9
    d = decode_image(tmp_path / "g16.png")
    assert "16-bit" in d.conversions and "grayscale" in d.conversions
    np.testing.assert_array_equal(d.pixels[..., 0], (v >> 8).astype(np.uint8))
    assert d.pixels.min() == 0 and d.pixels.max() == 255


def test_16bit_rgb_png_matches_cv2_exact_read(tmp_path):
    v = np.random.default_rng(1).integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), v)  # BGR on disk order as cv2 writes it
    exact = cv2.imread(str(tmp_path / "c16.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]  # RGB uint16
    d = decode_image(tmp_path / "c16.png")
    assert "16-bit" in d.conversions
    np.testing.assert_array_equal(d.pixels, (exact >> 8).astype(np.uint8))


def test_32bit_int_and_float(tmp_path):
    i = np.array([[0, 1000], [100000, 200000]], np.int32)
    Image.fromarray(i, "I").save(tmp_path / "i.tif")
    d = decode_image(tmp_path / "i.tif")
    assert "32-bit" in d.conversions
    assert d.pixels[0, 0, 0] == 0 and d.pixels[1, 1, 0] == 255 and 0 < d.pixels[1, 0, 0] < 255
    f = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    d = decode_image(tmp_path / "f.tif")
    assert "float" in d.conversions
    np.testing.assert_array_equal(d.pixels[..., 0], [[0, 128], [64, 255]])


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., :3] = 200
    a[..., 3] = [[255, 0], [128, 255]]
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    d = decode_image(tmp_path / "a.png")
    assert d.conversions == ("rgba",)
    np.testing.assert_array_equal(d.pixels[..., 0], [[200, 0], [100, 200]])


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    im.putdata([0, 1, 2, 1, 1, 1, 2, 0])
    im.save(tmp_path / "p.png")
    d = decode_image(tmp_path / "p.png")
    assert d.conversions == ("palette",)
    assert tuple(d.pixels[0, 1]) == (255, 0, 0) and tuple(d.pixels[0, 2]) == (0, 255, 0)
    im.save(tmp_path / "pt.png", transparency=1)
    d = decode_image(tmp_path / "pt.png")
    assert d.conversions == ("palette", "rgba")
    assert tuple(d.pixels[0, 1]) == (0, 0, 0) and tuple(d.pixels[0, 2]) == (0, 255, 0)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # red in CMYK
    d = decode_image(tmp_path / "c.jpg")
    assert d.conversions == ("cmyk",) and d.pixels.shape == (6, 8, 3)
    r, g, b = d.pixels.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def _exif_jpeg(path, a: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=100, subsampling=0)


def test_exif_orientation_applied_or_reported(tmp_path):
    a = np.zeros((4, 12, 3), np.uint8)
    a[:, :6] = 255  # left half white: orientation must move it
    _exif_jpeg(tmp_path / "e.jpg", a, 6)
    d = decode_image(tmp_path / "e.jpg")
    assert d.conversions == ("exif-rotated",) and d.stored_size == (4, 12) and d.pixels.shape == (12, 4, 3)
    assert d.orientation == 6
    raw = decode_image(tmp_path / "e.jpg", exif=False)
    assert raw.conversions == () and raw.pixels.shape == (4, 12, 3) and raw.orientation == 6
    np.testing.assert_array_equal(apply_orientation(raw.pixels, 6), d.pixels)
    assert oriented_size(raw.stored_size, 6) == (12, 4)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pil(orientation):
    a = _rgb(3, 5, seed=orientation)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    ref = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(apply_orientation(a, orientation), ref)


@pytest.mark.parametrize("case,reason", [("missing", "missing"), ("empty", "empty"), ("truncated", "truncated"),
                                         ("text", "not an image")])
def test_broken_files_refused(tmp_path, case, reason):
    p = tmp_path / "x.jpg"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "truncated":
        Image.fromarray(_rgb(64, 64)).save(p, quality=95)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif case == "text":
        p.write_text("not an image at all")
    with pytest.raises(UnreadableImage) as e:
        decode_image(p)
    assert isinstance(e.value, DataError) and e.value.reason == reason and str(p) in str(e.value)
    again = pickle.loads(pickle.dumps(e.value))  # crosses DataLoader worker boundaries
    assert again.reason == reason and str(again) == str(e.value)


def test_truncated_images_setting_untouched(tmp_path):
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
