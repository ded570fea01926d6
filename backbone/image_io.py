"""Read any image file as (H, W, 3) uint8 RGB, saying what was repaired, or refuse it clearly.

:func:`decode_image` is the one image reader of the datasets and tools. ``PIL``'s
``convert("RGB")`` alone is wrong for several files found in real datasets; this module repairs them
and reports each repair as a short tag in :attr:`DecodedImage.conversions`:

==================  ============================================================================
tag                 what the file is and what is done
==================  ============================================================================
``grayscale``       L / 1 / I;16 ... single channel: replicated to 3 channels
``palette``         P: looked up in its palette (with transparency: as ``rgba`` below)
``rgba``            RGBA / LA / PA / P with a transparent colour: composited on BLACK, i.e. the
                    colour is multiplied by alpha. Black, not white: the result does not depend on
                    the (arbitrary) colour stored under fully transparent pixels, opaque images are
                    unchanged, and it is premultiplied alpha, one multiply per pixel.
``cmyk``            CMYK (and Adobe's inverted CMYK) JPEGs: PIL's CMYK -> RGB conversion
``16-bit``          16 bits per sample (I;16* grayscale, RGB(A) PNGs): the top 8 bits (``>> 8``),
                    never clipped (``convert("RGB")`` of an I;16 image clips to all-white).
                    PIL >= 10 already decodes 16-bit RGB PNGs to their top byte (``RGB;16B``,
                    checked in tests/test_image_io.py against cv2's exact read), so only the tag is added.
``32-bit``          32-bit integer (mode I): values in 0..65535 are taken as 16-bit (``>> 8``,
                    PIL's way of opening some 16-bit files), any other range is scaled linearly
                    from its own min..max to 0..255.
``float``           32-bit float (mode F, TIFF): values in [0, 1] are multiplied by 255, any other
                    range is scaled from its own min..max.
``exif-rotated``    an EXIF orientation (tag 0x0112) other than 1, applied with
                    ``PIL.ImageOps.exif_transpose`` (only when ``exif=True``).
==================  ============================================================================

A file that cannot be decoded (missing, zero bytes, truncated, not an image) raises
:class:`UnreadableImage`, a :class:`~backbone.errors.DataError` with a short ``reason``. PIL's
``LOAD_TRUNCATED_IMAGES`` is never enabled: a truncated JPEG is refused, not padded with grey.

The common case, an 8-bit RGB JPEG without orientation, is decoded once into one array
(``np.asarray`` of the decoded image, read-only, C-contiguous) with no conversion copy.

Datasets: COCO / VOC annotations are in the frame of the STORED pixels (the annotation tools of the
time ignored EXIF), so datasets call ``decode_image(path, exif=False)`` and use
:attr:`DecodedImage.orientation` with :func:`apply_orientation` only when the annotated size says
the annotator saw the rotated image.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from backbone.errors import DataError

#: EXIF tag of the orientation
ORIENTATION = 0x0112
#: orientations that swap width and height
SWAPS_AXES = frozenset({5, 6, 7, 8})

_FIX = "re-download or re-export the image, or remove it from the dataset"


class UnreadableImage(DataError):
    """An image file that cannot be decoded.

    ``reason`` is a short tag for summaries: ``missing`` | ``empty`` | ``truncated`` |
    ``not an image`` | ``corrupt``; ``str(err)`` reads ``"<path>: unreadable image (<reason>: <detail>) -- fix: ..."``.
    """

    def __init__(self, path: object, reason: str, detail: str = "", fix: str = _FIX) -> None:
        self.reason = reason
        super().__init__(path, f"unreadable image ({reason}{': ' + detail if detail else ''})", fix)

    def __reduce__(self):  # picklable across DataLoader workers
        return (_rebuild_unreadable, (self.path, self.reason, self.problem, self.fix))


def _rebuild_unreadable(path: str, reason: str, problem: str, fix: str) -> "UnreadableImage":
    err = UnreadableImage.__new__(UnreadableImage)
    err.reason = reason
    DataError.__init__(err, path, problem, fix)
    return err


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image.

    pixels:       (H, W, 3) uint8 RGB, C-contiguous (after the EXIF transpose when one was applied).
    conversions:  what was repaired, short tags (see the module docstring); () for plain 8-bit RGB.
    stored_size:  (h, w) of the pixels as stored in the file, before any EXIF transpose.
    orientation:  the file's EXIF orientation, 1..8 (1: none), whether applied or not.
    """

    pixels: np.ndarray
    conversions: tuple[str, ...]
    stored_size: tuple[int, int]
    orientation: int = 1


def _exif_orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; a missing or broken EXIF block counts as 1 (the pixels are still fine)."""
    try:
        o = int(im.getexif().get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not make a good image unreadable
        return 1
    return o if 1 <= o <= 8 else 1


def _scale_to_uint8(a: np.ndarray, tags: list[str]) -> np.ndarray:
    """A 16/32-bit integer or float single-channel array (H, W) -> uint8, scaling its real range."""
    if a.dtype == np.uint16 or a.dtype.newbyteorder("=") == np.dtype(np.uint16):
        tags.append("16-bit")
        return (a.astype(np.uint16) >> 8).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        tags.append("float")
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
    else:
        tags.append("32-bit")
        lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
        if lo >= 0 and hi <= 65535:
            return (a >> 8).astype(np.uint8)
        a = a.astype(np.float64)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(im: Image.Image, tags: list[str]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a loaded PIL image of any mode; appends the repair tags."""
    mode = im.mode
    if mode == "RGB":  # hot path: no conversion copy
        return np.asarray(im)
    if mode == "P":
        tags.append("palette")
        if "transparency" in im.info:
            im, mode = im.convert("RGBA"), "RGBA"
        else:
            return np.asarray(im.convert("RGB"))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode in ("LA", "La"):
            tags.append("grayscale")
        tags.append("rgba")
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3:4].astype(np.uint16)
        # composite on black: colour * alpha / 255, rounded (integer maths, no float image)
        return ((rgba[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    if mode == "CMYK":
        tags.append("cmyk")
        return np.asarray(im.convert("RGB"))
    if mode in ("L", "1"):
        tags.append("grayscale")
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I, F: single channel, high precision
        tags.append("grayscale")
        gray = _scale_to_uint8(np.asarray(im), tags)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    tags.append(mode.lower())  # YCbCr, LAB, HSV, RGBX ...: PIL's own conversion
    return np.asarray(im.convert("RGB"))


def decode_image(path: str | Path, exif: bool = True) -> DecodedImage:
    """Decode ``path`` as (H, W, 3) uint8 RGB, repairing what can be repaired (see the module docstring).

    exif: apply the EXIF orientation (``PIL.ImageOps.exif_transpose``); False returns the stored pixels
        (the orientation is still reported in :attr:`DecodedImage.orientation`).
    Raises :class:`UnreadableImage` (missing, zero bytes, truncated, not an image).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UnreadableImage(path, "missing", "no such file") from None
    except OSError as e:
        raise UnreadableImage(path, "corrupt", str(e)) from None
    if size == 0:
        raise UnreadableImage(path, "empty", "zero bytes")
    tags: list[str] = []
    try:
        with Image.open(path) as im:
            # 16-bit RGB(A) PNGs decode to their top byte (rawmode RGB;16B); the tile is gone after load()
            if im.mode in ("RGB", "RGBA") and im.tile and ";16" in str(getattr(im.tile[0], "args", "")):
                tags.append("16-bit")
            im.load()
            stored = (im.height, im.width)
            orientation = _exif_orientation(im)
            if exif and orientation != 1:
                im = ImageOps.exif_transpose(im)
                tags.append("exif-rotated")
            pixels = _to_rgb(im, tags)
    except Image.UnidentifiedImageError as e:
        raise UnreadableImage(path, "not an image", str(e)) from None
    except (OSError, SyntaxError, EOFError, struct.error) as e:
        reason = "truncated" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "corrupt"
        raise UnreadableImage(path, reason, str(e) or type(e).__name__) from None
    except (ValueError, Image.DecompressionBombError, MemoryError) as e:
        raise UnreadableImage(path, "corrupt", str(e) or type(e).__name__) from None
    # "palette"/"exif-rotated" first, then the rest in the order found; no duplicates
    conversions = tuple(dict.fromkeys(tags))
    return DecodedImage(pixels, conversions, stored, orientation)


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF ``orientation`` (1..8) to stored pixels (H, W, C) -> the displayed image.

    The same result as ``PIL.ImageOps.exif_transpose`` (checked in tests), on an array: for datasets
    that decide to rotate only after comparing sizes with their annotations.
    """
    if orientation == 2:
        out = pixels[:, ::-1]
    elif orientation == 3:
        out = pixels[::-1, ::-1]
    elif orientation == 4:
        out = pixels[::-1]
    elif orientation == 5:
        out = pixels.swapaxes(0, 1)
    elif orientation == 6:
        out = pixels.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        out = pixels.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        out = pixels.swapaxes(0, 1)[::-1]
    else:
        return pixels
    return np.ascontiguousarray(out)


def oriented_size(stored_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(h, w) of the displayed image given the stored (h, w) and the EXIF orientation."""
    return (stored_size[1], stored_size[0]) if orientation in SWAPS_AXES else tuple(stored_size)
