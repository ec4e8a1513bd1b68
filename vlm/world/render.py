"""Procedural drawings of the world's entities.

Each entity has a *look* (shape, colours, pattern) that identifies it; each
rendering of it varies pose (position, scale, mirroring), colour (jitter) and
background, so that several images show the same entity differently (modal
generality). Kinds are drawn differently: landmarks are buildings on ground
under a sky, people are figures with a hat and a shirt, brands are logos.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageDraw

IMAGE_SIZE = 64

PALETTE = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (225, 200, 40),
    "purple": (140, 50, 170),
    "orange": (235, 130, 30),
    "cyan": (40, 180, 190),
    "black": (30, 30, 30),
    "white": (235, 235, 235),
    "brown": (120, 75, 40),
}
SHAPES = {
    "landmark": ("triangle", "dome", "spire", "flat", "steps", "twin"),
    "person": ("none", "cap", "tall", "crown", "band", "bowl"),
    "brand": ("circle", "square", "triangle", "diamond", "hexagon", "star"),
}
PATTERNS = ("plain", "stripes", "dots", "cross")


def sample_looks(rng: random.Random, kind: str, n: int) -> list[dict[str, Any]]:
    """n distinct looks for entities of one kind (distinct shape/colour/pattern)."""
    colours = list(PALETTE)
    combos = [(s, c, p) for s in SHAPES[kind] for c in colours for p in PATTERNS]
    rng.shuffle(combos)
    looks = []
    for shape, colour, pattern in combos[:n]:
        accent = rng.choice([c for c in colours if c != colour])
        looks.append({"shape": shape, "colour": colour, "accent": accent, "pattern": pattern})
    return looks


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def _pattern(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], pattern: str, colour) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if pattern == "stripes":
        for i in range(1, 4):
            y = y0 + h * i / 4
            draw.line([(x0 + 1, y), (x1 - 1, y)], fill=colour, width=2)
    elif pattern == "dots":
        for i in (0.3, 0.7):
            for j in (0.3, 0.7):
                cx, cy = x0 + w * i, y0 + h * j
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
    elif pattern == "cross":
        draw.line([(x0 + w / 2, y0 + 2), (x0 + w / 2, y1 - 2)], fill=colour, width=3)
        draw.line([(x0 + 2, y0 + h / 2), (x1 - 2, y0 + h / 2)], fill=colour, width=3)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "hexagon":
        return [
            (cx + r * dx, cy + r * dy)
            for dx, dy in ((1, 0), (0.5, 0.87), (-0.5, 0.87), (-1, 0), (-0.5, -0.87), (0.5, -0.87))
        ]
    if shape == "star":
        import math

        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def _draw_landmark(draw, look, rng, s, ox, oy):
    colour = _jitter(PALETTE[look["colour"]], rng)
    accent = _jitter(PALETTE[look["accent"]], rng)
    ground = 50 + oy
    draw.rectangle([0, ground, IMAGE_SIZE, IMAGE_SIZE], fill=_jitter((90, 140, 70), rng, 25))
    bw, bh = 26 * s, 22 * s
    x0, x1 = 32 + ox - bw / 2, 32 + ox + bw / 2
    y1, y0 = ground, ground - bh
    shape = look["shape"]
    if shape == "twin":
        draw.rectangle([x0, y0 - 10 * s, x0 + bw * 0.35, y1], fill=colour)
        draw.rectangle([x1 - bw * 0.35, y0 - 10 * s, x1, y1], fill=colour)
        draw.rectangle([x0, y0 + 6 * s, x1, y1], fill=colour)
    elif shape == "steps":
        for i in range(3):
            inset = i * bw / 7
            draw.rectangle([x0 + inset, y0 - i * 6 * s, x1 - inset, y1], fill=colour)
    else:
        draw.rectangle([x0, y0, x1, y1], fill=colour)
        if shape == "triangle":
            draw.polygon([(x0 - 2, y0), (x1 + 2, y0), ((x0 + x1) / 2, y0 - 14 * s)], fill=accent)
        elif shape == "dome":
            draw.pieslice([x0, y0 - bw / 2, x1, y0 + bw / 2], 180, 360, fill=accent)
        elif shape == "spire":
            draw.polygon([((x0 + x1) / 2 - 4, y0), ((x0 + x1) / 2 + 4, y0), ((x0 + x1) / 2, y0 - 22 * s)], fill=accent)
        elif shape == "flat":
            draw.rectangle([x0 - 3, y0 - 4, x1 + 3, y0], fill=accent)
    _pattern(draw, (x0, y0, x1, y1), look["pattern"], accent)


def _draw_person(draw, look, rng, s, ox, oy):
    colour = _jitter(PALETTE[look["colour"]], rng)
    accent = _jitter(PALETTE[look["accent"]], rng)
    skin = _jitter((225, 185, 150), rng, 12)
    cx, cy = 32 + ox, 22 + oy
    r = 8 * s
    body = [cx - 13 * s, cy + r + 2, cx + 13 * s, cy + r + 28 * s]
    draw.rectangle(body, fill=colour)
    _pattern(draw, tuple(body), look["pattern"], accent)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=skin)
    hat = look["shape"]
    if hat == "cap":
        draw.pieslice([cx - r, cy - r - 3, cx + r, cy + r - 3], 180, 360, fill=accent)
        draw.rectangle([cx, cy - 4, cx + r + 5, cy - 2], fill=accent)
    elif hat == "tall":
        draw.rectangle([cx - r * 0.7, cy - r - 12 * s, cx + r * 0.7, cy - r + 1], fill=accent)
        draw.rectangle([cx - r - 2, cy - r, cx + r + 2, cy - r + 2], fill=accent)
    elif hat == "crown":
        draw.polygon(
            [
                (cx - r, cy - r + 2),
                (cx - r, cy - r - 7),
                (cx - r / 2, cy - r - 2),
                (cx, cy - r - 8),
                (cx + r / 2, cy - r - 2),
                (cx + r, cy - r - 7),
                (cx + r, cy - r + 2),
            ],
            fill=accent,
        )
    elif hat == "band":
        draw.rectangle([cx - r, cy - r / 2 - 2, cx + r, cy - r / 2 + 2], fill=accent)
    elif hat == "bowl":
        draw.ellipse([cx - r - 4, cy - r - 2, cx + r + 4, cy - r + 4], fill=accent)
        draw.ellipse([cx - r / 2, cy - r - 7, cx + r / 2, cy - r + 1], fill=accent)


def _draw_brand(draw, look, rng, s, ox, oy):
    colour = _jitter(PALETTE[look["colour"]], rng)
    accent = _jitter(PALETTE[look["accent"]], rng)
    cx, cy, r = 32 + ox, 32 + oy, 20 * s
    if look["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(look["shape"], cx, cy, r), fill=colour)
    _pattern(draw, (cx - r * 0.6, cy - r * 0.5, cx + r * 0.6, cy + r * 0.6), look["pattern"], accent)


_DRAW = {"landmark": _draw_landmark, "person": _draw_person, "brand": _draw_brand}


def render_entity(kind: str, look: dict[str, Any], seed: str) -> Image.Image:
    """One rendering of an entity; ``seed`` picks pose, jitter and background."""
    rng = random.Random(seed)
    if kind == "landmark":
        bg = _jitter((150, 195, 235), rng, 30)
    else:
        bg = tuple(rng.randint(170, 250) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):  # background clutter: faint specks
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        draw.point((x, y), fill=_jitter(bg, rng, 40))
    scale = rng.uniform(0.8, 1.1)
    ox, oy = rng.randint(-6, 6), rng.randint(-4, 4)
    _DRAW[kind](draw, look, rng, scale, ox, oy)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img
