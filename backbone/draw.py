"""The one drawing module: pictures of detections and masks for evaluate, predict and TensorBoard.

Everything works on (H, W, 3) uint8 RGB numpy arrays and returns a new array (the input is never
modified). Sizes follow the picture: line width ~ max(H, W) / 250, font ~ max(H, W) / 40 (at least
10 px), so a 4000 px photo and a 96 px val crop both stay legible.

- :func:`draw_boxes`: boxes in their class colour with a filled label tag (class name, score) whose
  text is black or white, whichever contrasts more with the tag; tags are kept inside the picture.
- :func:`overlay_mask`: a class mask blended over the image, with a legend of the classes present.
- :func:`confusion_matrix_image`, :func:`pr_curve_image`: plots drawn with PIL (no matplotlib).
- :func:`side_by_side`: panels with titles (prediction | ground truth).
"""
from __future__ import annotations

import colorsys
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOUR = (255, 255, 255)
IGNORE_COLOUR = (255, 255, 255)  # mask value 255 (void) in overlays


# ------------------------------------------------------------------------------------ colours
def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct saturated colours, one per contiguous label 1..K (index 0 unused, black)."""
    out = [(0, 0, 0)]
    for k in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.9, 1.0)  # golden-ratio hue steps
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def seg_palette(num: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (num, 3) uint8: the colours of the palette PNG masks."""
    from backbone.training.voc_format import voc_palette

    return voc_palette(num)


def text_colour(fill: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``fill`` (WCAG relative luminance)."""
    c = np.asarray(fill[:3], np.float64) / 255.0
    lin = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lum = float(lin @ np.array([0.2126, 0.7152, 0.0722]))
    # contrast ratio with black (lum + .05) / .05 vs with white 1.05 / (lum + .05)
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


# ------------------------------------------------------------------------------------- sizes
def line_width(height: int, width: int) -> int:
    """Box outline width for an H x W picture (1 px up to 375 px, 16 px at 4000 px)."""
    return max(1, round(max(height, width) / 250))


def font_size(height: int, width: int) -> int:
    """Label font size in px for an H x W picture (10 px for small pictures)."""
    return max(10, round(max(height, width) / 40))


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` px (the bitmap default where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, f: ImageFont.ImageFont) -> tuple[int, int, int, int]:
    """(width, height, x offset, y offset) of ``text``'s ink box."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    return x1 - x0, y1 - y0, x0, y0


# ----------------------------------------------------------------------------------- boxes
def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray | None = None,
               scores: np.ndarray | None = None, class_names: Sequence[str] | None = None,
               colours: Sequence[tuple[int, int, int]] | None = None, score_threshold: float = 0.0,
               gt_boxes: np.ndarray | None = None) -> np.ndarray:
    """Boxes with a filled label tag over a copy of ``image``.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) xyxy in image pixels; labels: (N,) contiguous 1..K (None: all 1);
            scores: (N,) or None (no score in the tag, nothing filtered).
        class_names: K names (label k -> class_names[k - 1]); None: the tag shows the label number.
        colours: colour of each label index (default :func:`class_colours`).
        score_threshold: boxes scoring below it are not drawn.
        gt_boxes: (M, 4) xyxy, drawn first, thin and white, without tags.
    Returns:
        (H, W, 3) uint8. The highest score is drawn last (on top); a tag sits above its box, or inside
        it when the box touches the top, and is shifted left to stay inside the picture.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")  # a copy
    h, w = canvas.height, canvas.width
    draw = ImageDraw.Draw(canvas)
    if gt_boxes is not None and len(gt_boxes):
        for x0, y0, x1, y1 in np.asarray(gt_boxes, np.float64).reshape(-1, 4).tolist():
            draw.rectangle((x0, y0, x1, y1), outline=GT_COLOUR, width=max(1, line_width(h, w) // 2))
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(boxes)
    labels = np.ones(n, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
    keep = np.ones(n, bool) if scores is None else np.asarray(scores, np.float64).reshape(-1) >= score_threshold
    order = np.flatnonzero(keep)
    if scores is not None:
        order = order[np.argsort(np.asarray(scores)[order], kind="stable")]  # highest score drawn last
    num_labels = int(labels.max()) if n else 0
    if colours is None:
        colours = class_colours(max(num_labels, len(class_names or [])))
    lw, f = line_width(h, w), font(font_size(h, w))
    pad = max(1, lw)
    for i in order.tolist():  # drawing is per box by nature (PIL); the model path stays batched
        x0, y0, x1, y1 = boxes[i].tolist()
        k = int(labels[i])
        colour = tuple(colours[k % len(colours)])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=lw)
        name = class_names[k - 1] if class_names is not None and 0 < k <= len(class_names) else str(k)
        text = name if scores is None else f"{name} {float(np.asarray(scores)[i]):.2f}"
        tw, th, ox, oy = _text_size(draw, text, f)
        tag_w, tag_h = tw + 2 * pad, th + 2 * pad
        tx = min(max(0.0, x0), max(0.0, w - tag_w))  # stay inside the picture horizontally
        ty = y0 - tag_h if y0 - tag_h >= 0 else max(0.0, y0)  # above the box, else inside its top
        ty = min(ty, max(0.0, h - tag_h))
        draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=colour)
        draw.text((tx + pad - ox, ty + pad - oy), text, fill=text_colour(colour), font=f)
    return np.asarray(canvas)


# ------------------------------------------------------------------------------------ masks
def overlay_mask(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str] | None = None,
                 palette: np.ndarray | None = None, alpha: float = 0.5, ignore_index: int = 255,
                 legend: bool = True) -> np.ndarray:
    """A class mask blended over ``image`` (background, class 0, left as is), with a legend below.

    Args:
        image: (H, W, 3) uint8 RGB; mask: (H, W) integer class indices (``ignore_index``: void, white).
        class_names: names of classes 0..K-1 for the legend (None: the indices).
        palette: (>= K, 3) uint8 colours (default: the VOC palette of the mask PNGs).
        alpha: opacity of the class colours.
        legend: append a strip below the picture naming the classes present, with their colours.
    Returns:
        (H + legend height, W, 3) uint8.
    """
    image = np.asarray(image, np.uint8)
    mask = np.asarray(mask).astype(np.int64)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
    palette = seg_palette() if palette is None else np.asarray(palette, np.uint8).reshape(-1, 3)
    lut = np.zeros((256, 3), np.uint8)
    lut[: min(256, len(palette))] = palette[:256]
    lut[ignore_index % 256] = IGNORE_COLOUR
    colour = lut[mask % 256].astype(np.float32)  # (H, W, 3), one table lookup
    weight = np.where(mask > 0, alpha, 0.0).astype(np.float32)[..., None]
    out = (image.astype(np.float32) * (1 - weight) + colour * weight).round().astype(np.uint8)
    if not legend:
        return out
    present = [int(v) for v in np.unique(mask) if v != ignore_index]
    entries = [(class_names[v] if class_names is not None and v < len(class_names) else str(v),
                tuple(int(c) for c in lut[v % 256])) for v in present]
    return np.concatenate([out, legend_strip(entries, out.shape[1], out.shape[0])], axis=0)


def legend_strip(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int, ref_height: int) -> np.ndarray:
    """A white strip ``width`` px wide listing (name, colour) entries as swatches, wrapped into rows.

    The font follows the picture the strip goes under (``ref_height`` x ``width``). Returns (h, width, 3).
    """
    f = font(font_size(ref_height, width))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, line_h, _, _ = _text_size(probe, "Ag", f)
    pad = max(2, line_h // 3)
    sw = line_h  # square swatch as tall as the text
    items, x, row = [], pad, 0
    for name, colour in entries:
        tw, _, ox, oy = _text_size(probe, name, f)
        item_w = sw + pad + tw + 2 * pad
        if x > pad and x + item_w > width:  # wrap
            x, row = pad, row + 1
        items.append((x, row, name, colour, ox, oy))
        x += item_w
    rows = row + 1 if entries else 1
    strip = Image.new("RGB", (width, rows * (line_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, row, name, colour, ox, oy in items:
        y = pad + row * (line_h + pad)
        draw.rectangle((x, y, x + sw - 1, y + sw - 1), fill=colour, outline=(0, 0, 0))
        draw.text((x + sw + pad - ox, y - oy), name, fill=(0, 0, 0), font=f)
    return np.asarray(strip)


# ----------------------------------------------------------------------------------- panels
def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None, gap: int = 4) -> np.ndarray:
    """Panels (H_i, W_i, 3) uint8 in a row on white, tops aligned, each under its title."""
    titles = list(titles) if titles is not None else [""] * len(panels)
    ref_h = max(p.shape[0] for p in panels)
    f = font(max(10, round(ref_h / 25)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = _text_size(probe, "Ag", f)[1] + 2 * gap if any(titles) else 0
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) + 1)
    canvas = Image.new("RGB", (width, ref_h + title_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for panel, title in zip(panels, titles):
        if title:
            _, _, ox, oy = _text_size(draw, title, f)
            draw.text((x - ox, gap - oy), title, fill=(0, 0, 0), font=f)
        canvas.paste(Image.fromarray(np.asarray(panel, np.uint8)), (x, title_h))
        x += panel.shape[1] + gap
    return np.asarray(canvas)


# ------------------------------------------------------------------------------------ plots
def confusion_matrix_image(matrix: np.ndarray, class_names: Sequence[str] | None = None,
                           cell: int = 28) -> np.ndarray:
    """A row-normalised confusion matrix (rows: ground truth, columns: prediction) as a heat map.

    Args:
        matrix: (K, K) counts. Each cell shows the fraction of its row (blue: 0 .. dark: 1), written in
            the cell when it is >= 0.01; rows without ground truth are grey.
        class_names: K names for the row and column labels (columns numbered, names on the rows).
    Returns:
        (H, W, 3) uint8.
    """
    m = np.asarray(matrix, np.float64)
    k = m.shape[0]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(k)]
    rows = m.sum(1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    f = font(max(9, cell // 2 - 2))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, f"{i} {n}", f)[0] for i, n in enumerate(names)) + 8
    top = cell + _text_size(probe, "prediction", f)[1] + 8
    size = (label_w + k * cell + 4, top + k * cell + 4)
    # white -> dark blue ramp, all cells in one array op
    lo, hi = np.array([247, 251, 255], np.float64), np.array([8, 48, 107], np.float64)
    colours = (lo + (hi - lo) * frac[..., None]).round().astype(np.uint8)
    colours[(rows[:, 0] == 0)] = 200
    grid = np.repeat(np.repeat(colours, cell, 0), cell, 1)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_w, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 2), "prediction", fill=(0, 0, 0), font=f)
    for i, name in enumerate(names):
        tw, th, ox, oy = _text_size(draw, f"{i} {name}", f)
        draw.text((label_w - 4 - tw - ox, top + i * cell + (cell - th) // 2 - oy), f"{i} {name}", fill=(0, 0, 0), font=f)
        tw, th, ox, oy = _text_size(draw, str(i), f)
        draw.text((label_w + i * cell + (cell - tw) // 2 - ox, top - th - 4 - oy), str(i), fill=(0, 0, 0), font=f)
    for i, j in zip(*np.nonzero(frac >= 0.01)):
        text = f"{round(100 * frac[i, j])}"
        fill = tuple(int(c) for c in colours[i, j])
        tw, th, ox, oy = _text_size(draw, text, f)
        draw.text((label_w + j * cell + (cell - tw) // 2 - ox, top + i * cell + (cell - th) // 2 - oy), text,
                  fill=text_colour(fill), font=f)
    return np.asarray(canvas)


def pr_curve_image(recall: np.ndarray, curves: Sequence[tuple[str, np.ndarray]], size: int = 320,
                   highlight: str | None = None) -> np.ndarray:
    """Precision-recall curves on one plot, with a legend.

    Args:
        recall: (R,) recall values in [0, 1] (e.g. COCO's 101 thresholds).
        curves: (name, precision (R,)) pairs; precision < 0 (COCO: no ground truth) is not drawn.
        highlight: the name drawn thick and black (e.g. the all-class curve).
    Returns:
        (H, W, 3) uint8: the plot, axes 0..1, then the legend strip.
    """
    f = font(max(10, size // 28))
    margin = size // 8
    canvas = Image.new("RGB", (size + 2 * margin, size + 2 * margin), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0, y0 = margin, margin + size  # origin (recall 0, precision 0)
    for t in np.linspace(0, 1, 6):
        draw.line((x0 + t * size, margin, x0 + t * size, y0), fill=(225, 225, 225))
        draw.line((x0, y0 - t * size, x0 + size, y0 - t * size), fill=(225, 225, 225))
        draw.text((x0 + t * size - 6, y0 + 3), f"{t:.1f}", fill=(0, 0, 0), font=f)
        draw.text((2, y0 - t * size - 6), f"{t:.1f}", fill=(0, 0, 0), font=f)
    draw.rectangle((x0, margin, x0 + size, y0), outline=(0, 0, 0))
    draw.text((x0 + size // 2 - 15, y0 + margin // 2), "recall", fill=(0, 0, 0), font=f)
    draw.text((x0, margin // 4), "precision", fill=(0, 0, 0), font=f)
    colours = class_colours(len(curves))
    entries = []
    r = np.asarray(recall, np.float64)
    for c, (name, p) in enumerate(curves):
        p = np.asarray(p, np.float64)
        ok = p >= 0
        if not ok.any():
            continue
        colour = (0, 0, 0) if name == highlight else colours[c + 1]
        pts = list(zip((x0 + r[ok] * size).tolist(), (y0 - p[ok] * size).tolist()))
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3 if name == highlight else 1)
        entries.append((name, colour))
    plot = np.asarray(canvas)
    return np.concatenate([plot, legend_strip(entries, plot.shape[1], plot.shape[0] // 2)], axis=0)
