"""Procedural objects and backgrounds for the embedded benchmark (batched, torch, deterministic).

Every renderer draws ``n`` instances of one object class at once on a coordinate grid in
[-1, 1]^2 and returns an RGB layer, an alpha (coverage) map and named part masks. Instances vary
in position, scale, rotation and colour; objects are drawn with soft (anti-aliased) edges.

The classes stand in for ImageNet classes of the paper (carton, dugong, crate, packet,
basketball) plus ten further classes that make the pretraining corpus multi-class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class Layer:
    """One rendered object layer: rgb (n,3,S,S) in [0,1], alpha (n,S,S) in [0,1], part masks."""

    rgb: Tensor
    alpha: Tensor
    parts: dict[str, Tensor]


class Canvas:
    """Per-batch random pose and drawing helpers on a [-1, 1]^2 grid."""

    def __init__(self, n: int, size: int, g: torch.Generator, scale=(0.55, 0.8), jitter=0.22,
                 rotate=0.35):
        self.n, self.size, self.g = n, size, g
        lin = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)
        self.yy, self.xx = torch.meshgrid(lin, lin, indexing="ij")
        self.px = 2.0 / size  # one pixel in grid units
        self.cx = self.uniform(-jitter, jitter)
        self.cy = self.uniform(-jitter, jitter)
        self.s = self.uniform(*scale)
        self.theta = self.uniform(-rotate, rotate)
        self.rgb = torch.zeros(n, 3, size, size)
        self.alpha = torch.zeros(n, size, size)
        self.parts: dict[str, Tensor] = {}

    # -------------------------------------------------------------- randomness
    def uniform(self, lo: float, hi: float, shape=None) -> Tensor:
        shape = (self.n,) if shape is None else shape
        return lo + (hi - lo) * torch.rand(shape, generator=self.g)

    def color(self, base, jitter=0.08) -> Tensor:
        """(n, 3) colours around ``base`` (an RGB triple or (n,3) tensor)."""
        base = torch.as_tensor(base, dtype=torch.float32).expand(self.n, 3)
        return (base + self.uniform(-jitter, jitter, (self.n, 3))).clamp(0, 1)

    def pick_colors(self, palette, jitter=0.06) -> Tensor:
        pal = torch.tensor(palette, dtype=torch.float32)
        idx = torch.randint(0, len(pal), (self.n,), generator=self.g)
        return self.color(pal[idx], jitter)

    # -------------------------------------------------------------- geometry
    def local(self, dx=0.0, dy=0.0, scale=1.0, theta=0.0):
        """Object coordinates (u, v) for a sub-part offset (dx, dy) in object units."""
        s = (self.s * scale)[:, None, None]
        th = (self.theta + theta)[:, None, None]
        x = self.xx[None] - self.cx[:, None, None]
        y = self.yy[None] - self.cy[:, None, None]
        u = (x * torch.cos(th) + y * torch.sin(th)) / s
        v = (-x * torch.sin(th) + y * torch.cos(th)) / s
        if not isinstance(dx, Tensor):
            dx = torch.full((self.n,), float(dx))
        if not isinstance(dy, Tensor):
            dy = torch.full((self.n,), float(dy))
        return u - dx[:, None, None], v - dy[:, None, None]

    def soft(self, signed: Tensor) -> Tensor:
        """Soft inside-indicator of a signed distance (object units, positive inside)."""
        edge = (self.px / self.s)[:, None, None] * 0.6
        return torch.sigmoid(signed / edge)

    def rect(self, u, v, hw, hh) -> Tensor:
        return self.soft(torch.minimum(_t(hw) - u.abs(), _t(hh) - v.abs()))

    def ellipse(self, u, v, a, b) -> Tensor:
        a, b = _t(a), _t(b)
        r = torch.sqrt((u / a) ** 2 + (v / b) ** 2 + 1e-12)
        return self.soft((1 - r) * torch.minimum(a, b) if isinstance(a, Tensor) else (1 - r) * min(a, b))

    def circle(self, u, v, r) -> Tensor:
        return self.soft(_t(r) - torch.sqrt(u ** 2 + v ** 2 + 1e-12))

    def triangle(self, u, v, half_w, top, bottom) -> Tensor:
        """Isosceles triangle, apex at (0, top), base at v=bottom of half width half_w."""
        height = bottom - top
        w_at = half_w * (v - top) / height
        return self.soft(torch.minimum(torch.minimum(w_at - u.abs(), v - top), bottom - v))

    def paint(self, mask: Tensor, color: Tensor, part: str | None = None) -> None:
        """Composite ``color`` (n,3) over the current layer where ``mask`` (n,S,S)."""
        m = mask.clamp(0, 1)
        self.rgb = self.rgb * (1 - m[:, None]) + color[:, :, None, None] * m[:, None]
        self.alpha = torch.maximum(self.alpha, m)
        if part is not None:
            prev = self.parts.get(part)
            self.parts[part] = m if prev is None else torch.maximum(prev, m)

    def layer(self) -> Layer:
        return Layer(self.rgb, self.alpha, {k: v > 0.5 for k, v in self.parts.items()})


def _t(x):
    return x[:, None, None] if isinstance(x, Tensor) and x.ndim == 1 else x


# ----------------------------------------------------------------------------- classes
BROWNS = [(0.72, 0.55, 0.36), (0.66, 0.48, 0.30), (0.78, 0.62, 0.42), (0.60, 0.44, 0.28)]
BRIGHT = [(0.85, 0.15, 0.15), (0.15, 0.55, 0.85), (0.2, 0.7, 0.25), (0.95, 0.8, 0.15),
          (0.6, 0.25, 0.7), (0.95, 0.5, 0.1)]


def draw_carton(c: Canvas, hardness: float = 0.0) -> None:
    """Cardboard box: tan body, darker top flaps, a tape strip, dark print on the side."""
    u, v = c.local()
    body = c.pick_colors(BROWNS, 0.05)
    c.paint(c.rect(u, v, 0.62, 0.5), body, "object")
    c.paint(c.rect(u, v + 0.36, 0.62, 0.14), body * 0.78, "object")   # flaps band
    c.paint(c.rect(u, v + 0.36, 0.07, 0.14), c.color((0.86, 0.78, 0.6), 0.04), "object")  # tape
    ink = c.color((0.15, 0.12, 0.1), 0.05)
    for dy in (0.05, 0.2):                                               # writing on box
        c.paint(c.rect(u + 0.2, v - dy, 0.22, 0.035), ink, "writing")


def draw_dugong(c: Canvas, hardness: float = 0.0) -> None:
    """Sea cow: a long grey body, a fluked tail and a flipper."""
    u, v = c.local(theta=0.0)
    skin = c.color((0.55, 0.55, 0.6), 0.07)
    c.paint(c.ellipse(u, v, 0.7, 0.26), skin, "object")
    c.paint(c.triangle(-(u - 0.62), v, 0.34, -0.02, 0.0 + 0.3), skin * 0.92, "object")
    c.paint(c.triangle(v, -(u - 0.88), 0.3, 0.0, 0.28), skin * 0.9, "object")  # tail fluke
    c.paint(c.ellipse(u + 0.15, v - 0.2, 0.16, 0.07), skin * 0.8, "object")   # flipper
    c.paint(c.circle(u + 0.55, v + 0.05, 0.035), c.color((0.1, 0.1, 0.1), 0.02), "object")  # eye


def draw_crate(c: Canvas, hardness: float = 0.0) -> None:
    """Wooden crate: horizontal planks with dark gaps and a diagonal brace."""
    u, v = c.local()
    wood = c.pick_colors(BROWNS, 0.05)
    c.paint(c.rect(u, v, 0.55, 0.55), wood * 0.55, "object")          # gaps / inside
    for dy in (-0.4, -0.13, 0.13, 0.4):
        c.paint(c.rect(u, v - dy, 0.55, 0.1), wood, "object")        # planks
    c.paint(c.rect(u, v, 0.55, 0.55) * c.soft(0.1 - (u - v).abs() * 0.7071), wood * 1.1, "brace")
    c.paint(c.rect(u + 0.5, v, 0.06, 0.55), wood * 0.85, "object")     # posts
    c.paint(c.rect(u - 0.5, v, 0.06, 0.55), wood * 0.85, "object")


def draw_packet(c: Canvas, hardness: float = 0.0) -> None:
    """Packet/pouch: crimped top and bottom seals, a printed label; colourful or kraft brown.

    ``hardness`` in [0, 1] makes packets look like crates: kraft brown more often, with
    printed horizontal bands.
    """
    u, v = c.local()
    kraft = c.uniform(0, 1) < (0.25 + 0.7 * hardness)
    col = torch.where(kraft[:, None], c.pick_colors(BROWNS, 0.05), c.pick_colors(BRIGHT, 0.05))
    c.paint(c.rect(u, v, 0.46, 0.6), col, "object")
    crimp = (torch.sin(u * 40) > 0).float()
    for dy in (-0.55, 0.55):
        band = c.rect(u, v - dy, 0.46, 0.06)
        c.paint(band * (0.5 + 0.5 * crimp), col * 0.6, "object")
    if hardness > 0:
        bands = c.rect(u, v, 0.46, 0.45) * (torch.sin(v * 11) > 0.4).float() * hardness
        c.paint(bands * 0.7, col * 0.6, "object")
    c.paint(c.rect(u, v, 0.26, 0.16), c.color((0.95, 0.95, 0.92), 0.03), "label")


def draw_basketball(c: Canvas, hardness: float = 0.0) -> None:
    """Basketball scene: wooden court with a line, two players in jerseys, an orange ball."""
    yy = c.yy[None].expand(c.n, -1, -1)
    floor_y = c.uniform(0.1, 0.35)[:, None, None]
    court = c.soft(yy - floor_y)
    c.paint(court, c.color((0.8, 0.6, 0.35), 0.05), "court")
    c.paint(court * c.soft(0.025 - (yy - floor_y - 0.25).abs()), c.color((0.95, 0.95, 0.95), 0.02), "court")
    jersey = c.pick_colors(BRIGHT, 0.05)
    skin = c.pick_colors([(0.9, 0.75, 0.6), (0.55, 0.38, 0.25), (0.75, 0.55, 0.4)], 0.03)
    for px in (-0.5, 0.35):
        x0 = px + c.uniform(-0.1, 0.1)
        xs = c.xx[None] - x0[:, None, None]
        ys = yy - floor_y
        c.paint(c.soft(torch.minimum(0.09 - xs.abs(), torch.minimum(ys + 0.0 + 0.0, -ys + 0.0) + 0.22)
                       ) * c.soft(-ys) * c.soft(ys + 0.22), skin * 0.6, "players")      # legs
        c.paint(c.soft(torch.minimum(0.14 - xs.abs(), 0.2 - (ys + 0.42).abs())), jersey, "players")
        c.paint(c.soft(0.09 - torch.sqrt(xs ** 2 + (ys + 0.72) ** 2)), skin, "players")
    u, v = c.local(scale=0.32)
    ball_col = c.color((0.92, 0.45, 0.1), 0.05)
    ball = c.circle(u, v, 0.9)
    c.paint(ball, ball_col, "ball")
    seams = ball * torch.maximum(c.soft(0.07 - u.abs()), c.soft(0.07 - v.abs()))
    c.paint(seams, c.color((0.1, 0.05, 0.0), 0.02), "ball")


def draw_volleyball(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local(scale=0.45)
    ball = c.circle(u, v, 0.9)
    c.paint(ball, c.color((0.95, 0.95, 0.9), 0.03), "object")
    c.paint(ball * c.soft(0.2 - (v - 0.3 * torch.sin(u * 2)).abs()), c.pick_colors(BRIGHT), "object")


def draw_star(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    r = torch.sqrt(u ** 2 + v ** 2 + 1e-12)
    ang = torch.atan2(v, u)
    radius = 0.35 + 0.3 * (0.5 + 0.5 * torch.cos(5 * ang))
    c.paint(c.soft(radius - r), c.color((0.95, 0.85, 0.2), 0.06), "object")


def draw_ring(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    r = torch.sqrt(u ** 2 + v ** 2 + 1e-12)
    c.paint(c.soft(0.14 - (r - 0.5).abs()), c.pick_colors(BRIGHT), "object")


def draw_cross(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    col = c.pick_colors(BRIGHT)
    c.paint(torch.maximum(c.rect(u, v, 0.6, 0.16), c.rect(u, v, 0.16, 0.6)), col, "object")


def draw_fish(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    col = c.color((0.95, 0.55, 0.15), 0.08)
    c.paint(c.ellipse(u, v, 0.5, 0.28), col, "object")
    c.paint(c.triangle(v, -(u - 0.75), 0.35, 0.0, 0.3), col, "object")
    c.paint(c.circle(u + 0.28, v + 0.06, 0.06), c.color((0.05, 0.05, 0.05), 0.01), "object")


def draw_bottle(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    col = c.pick_colors([(0.2, 0.55, 0.25), (0.45, 0.3, 0.15), (0.3, 0.5, 0.7)])
    c.paint(c.rect(u, v - 0.15, 0.22, 0.45), col, "object")
    c.paint(c.rect(u, v + 0.45, 0.08, 0.18), col, "object")
    c.paint(c.rect(u, v - 0.1, 0.22, 0.12), c.color((0.9, 0.9, 0.85)), "object")


def draw_car(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    col = c.pick_colors(BRIGHT)
    c.paint(c.rect(u, v, 0.7, 0.18), col, "object")
    c.paint(c.rect(u + 0.05, v + 0.28, 0.35, 0.14), col * 0.85, "object")
    c.paint(c.rect(u + 0.05, v + 0.28, 0.3, 0.09), c.color((0.7, 0.85, 0.95)), "object")
    for dx in (-0.42, 0.42):
        c.paint(c.circle(u - dx, v - 0.2, 0.16), c.color((0.08, 0.08, 0.08), 0.02), "object")


def draw_tree(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    c.paint(c.rect(u, v - 0.5, 0.08, 0.22), c.color((0.4, 0.25, 0.1)), "object")
    c.paint(c.triangle(u, v, 0.5, -0.7, 0.35), c.color((0.15, 0.5, 0.2), 0.07), "object")


def draw_house(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    c.paint(c.rect(u, v - 0.2, 0.45, 0.35), c.pick_colors([(0.85, 0.8, 0.7), (0.7, 0.75, 0.85)]), "object")
    c.paint(c.triangle(u, v, 0.6, -0.6, -0.15), c.color((0.6, 0.15, 0.1), 0.06), "object")
    c.paint(c.rect(u, v - 0.38, 0.1, 0.17), c.color((0.3, 0.2, 0.1)), "object")


def draw_flower(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    col = c.pick_colors([(0.95, 0.3, 0.5), (0.9, 0.9, 0.95), (0.6, 0.3, 0.8), (0.95, 0.6, 0.1)])
    for k in range(5):
        a = 2 * math.pi * k / 5
        c.paint(c.circle(u - 0.32 * math.cos(a), v - 0.32 * math.sin(a), 0.22), col, "object")
    c.paint(c.circle(u, v, 0.17), c.color((0.95, 0.8, 0.1)), "object")


def draw_mushroom(c: Canvas, hardness: float = 0.0) -> None:
    u, v = c.local()
    c.paint(c.rect(u, v - 0.25, 0.12, 0.3), c.color((0.92, 0.9, 0.82)), "object")
    cap = c.ellipse(u, v + 0.05, 0.5, 0.3) * c.soft(-(v + 0.0))
    c.paint(cap, c.color((0.8, 0.15, 0.1), 0.06), "object")


RENDERERS: dict[str, Callable[[Canvas, float], None]] = {
    "carton": draw_carton,
    "dugong": draw_dugong,
    "crate": draw_crate,
    "packet": draw_packet,
    "basketball": draw_basketball,
    "volleyball": draw_volleyball,
    "star": draw_star,
    "ring": draw_ring,
    "cross": draw_cross,
    "fish": draw_fish,
    "bottle": draw_bottle,
    "car": draw_car,
    "tree": draw_tree,
    "house": draw_house,
    "flower": draw_flower,
    "mushroom": draw_mushroom,
}


def render_objects(name: str, n: int, size: int, g: torch.Generator, hardness: float = 0.0,
                   scale=(0.55, 0.8)) -> Layer:
    """Render ``n`` instances of object class ``name``."""
    canvas = Canvas(n, size, g, scale=scale)
    RENDERERS[name](canvas, hardness)
    return canvas.layer()


def render_backgrounds(n: int, size: int, g: torch.Generator, contrast: float = 0.35) -> Tensor:
    """Textured backgrounds (n, 3, S, S) in [0, 1]: smooth colour fields, stripes or speckle."""
    base = 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    coarse = torch.rand(n, 3, 4, 4, generator=g) - 0.5
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    img = base + contrast * field
    kind = torch.randint(0, 3, (n,), generator=g)
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    ang = torch.rand(n, generator=g) * math.pi
    freq = 4 + 10 * torch.rand(n, generator=g)
    proj = xx[None] * torch.cos(ang)[:, None, None] + yy[None] * torch.sin(ang)[:, None, None]
    stripes = torch.sin(proj * freq[:, None, None] * math.pi) * 0.08
    speckle = (torch.rand(n, 1, size, size, generator=g) - 0.5) * 0.12
    img = img + torch.where((kind == 1)[:, None, None, None], stripes[:, None], torch.zeros(()))
    img = img + torch.where((kind == 2)[:, None, None, None], speckle, torch.zeros(()))
    return img.clamp(0, 1)


def compose(background: Tensor, layer: Layer) -> Tensor:
    """Alpha-composite an object layer over backgrounds."""
    a = layer.alpha[:, None]
    return background * (1 - a) + layer.rgb * a
