"""backbone.draw: readable label tags, sizes that follow the picture, tags inside the picture, mask legends,
and the PIL-drawn plots (no matplotlib)."""
from __future__ import annotations

import numpy as np
import pytest

from backbone.draw import (
    class_colours,
    confusion_matrix_image,
    draw_boxes,
    font,
    font_size,
    line_width,
    overlay_mask,
    pr_curve_image,
    side_by_side,
    text_colour,
)


def _contrast(a, b) -> float:
    def lum(c):
        c = np.asarray(c, np.float64) / 255.0
        lin = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return float(lin @ [0.2126, 0.7152, 0.0722])

    hi, lo = sorted([lum(a), lum(b)], reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("colour", [(255, 255, 0), (0, 0, 160), (0, 200, 0), (230, 25, 25)])
def test_tag_text_contrasts_with_the_tag(colour) -> None:
    """On a busy background the text sits on a filled tag, in the colour contrasting most with it."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)  # noise: the worst background
    out = draw_boxes(image, np.array([[50, 80, 250, 180]]), np.array([1]), np.array([0.87]), ["person"],
                     colours=[(0, 0, 0), colour])
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "person 0.87", font=font(font_size(200, 300)))
    tag_h, tag_w = y1 - y0 + 2 * line_width(200, 300), x1 - x0 + 2 * line_width(200, 300)
    tag = out[80 - tag_h:80, 50:50 + tag_w].reshape(-1, 3)  # the tag sits right above the box
    is_fill = (tag == colour).all(1)
    assert is_fill.mean() > 0.4, "the tag is not filled with the box colour"
    text = tag[~is_fill]
    assert len(text) > 10, "no text drawn in the tag"
    tc = text_colour(colour)
    full = np.abs(np.subtract(tc, colour)).sum()
    ink = text[np.abs(text.astype(int) - colour).sum(1) > 0.6 * full]  # glyph cores, not antialiased edges
    assert len(ink) > 5
    farthest = ink[np.abs(ink.astype(int) - colour).sum(1).argmax()]
    assert np.abs(farthest.astype(int) - tc).max() <= 40  # black or white text (antialiased)
    assert _contrast(tc, colour) >= 4.5  # WCAG AA for normal text (every saturated class colour reaches it)
    assert _contrast(farthest, colour) >= 4.0  # as drawn, antialiasing included
    assert _contrast(tc, colour) >= _contrast(np.subtract(255, tc), colour)  # the better of black and white


def test_lines_and_fonts_scale_with_the_picture() -> None:
    def outline_width(size: int) -> int:
        image = np.zeros((size, size, 3), np.uint8)
        box = np.array([[0.2, 0.3, 0.8, 0.9]]) * size
        out = draw_boxes(image, box, np.array([1]), np.array([0.9]), ["a"], colours=[(0, 0, 0), (255, 0, 0)])
        row = out[int(0.6 * size), : int(0.5 * size)]
        return int((row == (255, 0, 0)).all(1).sum())  # red pixels crossing the left edge

    small, large = outline_width(100), outline_width(2000)
    assert small == line_width(100, 100) == 1
    assert large == line_width(2000, 2000) == 8
    assert font_size(2000, 2000) > font_size(100, 100) >= 10


@pytest.mark.parametrize("corner", ["top_right", "top_left", "bottom_right"])
def test_tags_stay_inside_the_picture_at_the_border(corner) -> None:
    h, w = 120, 200
    box = {"top_right": [w - 10, 0, w - 1, 12], "top_left": [0, 0, 8, 8], "bottom_right": [w - 6, h - 6, w - 1, h - 1]}
    colour = (255, 255, 0)
    out = draw_boxes(np.zeros((h, w, 3), np.uint8), np.array([box[corner]], np.float32), np.array([1]),
                     np.array([0.5]), ["a_long_class_name"], colours=[(0, 0, 0), colour])
    from PIL import Image, ImageDraw

    f = font(font_size(h, w))
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "a_long_class_name 0.50", font=f)
    pad = line_width(h, w)
    tag_w = x1 - x0 + 2 * pad
    filled = (out == colour).all(2)
    rows = np.flatnonzero(filled.sum(1) >= tag_w)
    assert len(rows) >= 1, "the whole tag width is not visible on any row: the tag was cut by the border"
    assert tag_w < w


def test_threshold_and_order() -> None:
    out = draw_boxes(np.zeros((60, 60, 3), np.uint8), np.array([[5, 30, 20, 50], [30, 30, 50, 50]]),
                     np.array([1, 2]), np.array([0.9, 0.1]), ["a", "b"], score_threshold=0.3)
    colours = class_colours(2)
    assert (out == colours[1]).all(2).any()
    assert not (out == colours[2]).all(2).any()  # below the threshold


def test_overlay_has_a_legend_of_the_present_classes() -> None:
    image = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 10:30] = 2
    mask[30:, :] = 255
    palette = np.array([[0, 0, 0], [200, 0, 0], [0, 200, 0]] + [[9, 9, 9]] * 253, np.uint8)
    out = overlay_mask(image, mask, ["background", "cat", "dog"], palette, alpha=0.5)
    assert out.shape[0] > 40 and out.shape[1] == 60  # the legend strip below
    assert tuple(out[15, 20]) == (50, 150, 50)  # blended half-half with class 2's colour
    assert tuple(out[5, 5]) == (100, 100, 100)  # background untouched
    legend = out[40:]
    assert (legend == (0, 200, 0)).all(2).sum() > 10  # swatch of the present class 2
    assert not (legend == (200, 0, 0)).all(2).any()  # class 1 is absent: not in the legend
    assert (image == 100).all()


def test_plots_are_drawn_without_matplotlib() -> None:
    cm = confusion_matrix_image(np.array([[8, 2, 0], [0, 5, 5], [0, 0, 0]]), ["bg", "cat", "dog"])
    assert cm.ndim == 3 and cm.dtype == np.uint8 and cm.shape[2] == 3
    recall = np.linspace(0, 1, 101)
    pr = pr_curve_image(recall, [("all classes", 1 - recall), ("cat", np.full(101, -1.0))], highlight="all classes")
    assert pr.ndim == 3 and (pr == 0).all(2).sum() > 100  # the thick black all-class curve
    both = side_by_side([cm, pr], ["a", "b"])
    assert both.shape[1] >= cm.shape[1] + pr.shape[1]
