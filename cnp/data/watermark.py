"""Visible watermarks: a parameterised style, rendering, and alpha blending with masks.

A watermark is semi-transparent text alpha-blended onto an image, as in stock photographs.
Its style is the parameter set of the paper companion (``wm_text``, ``wm_size``,
``wm_opacity``, ``wm_color``, ``wm_placement``); every rendered image also yields a boolean
mask of the pixels the watermark covers, so relevance on watermark pixels can be measured.

The same renderer builds w1 images from clean ones on the ImageNet path (when no per-image
watermark labels and no ``imagenet-w`` package are available).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cnp.io import CNPError

PLACEMENTS = ("fixed", "random", "tiled")

_NAMED_COLORS = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
    "red": (0.9, 0.1, 0.1),
    "yellow": (1.0, 0.9, 0.1),
}


@dataclass(frozen=True)
class WatermarkStyle:
    """How a watermark looks.

    Parameters
    ----------
    wm_text : str
        The text drawn (any printable characters).
    wm_size : float
        Text height as a fraction of the image side (0.05-0.6).
    wm_opacity : float
        Alpha of the text, in (0, 1].
    wm_color : str or tuple
        A colour name (white, black, gray, red, yellow) or an RGB triple in [0, 1].
    wm_placement : str
        ``fixed`` (centred), ``random`` (anywhere it fits, per image) or ``tiled`` (a grid
        of copies over the whole image, with a random per-image offset).
    """

    wm_text: str = "stock"
    wm_size: float = 0.22
    wm_opacity: float = 0.55
    wm_color: str | tuple[float, float, float] = "white"
    wm_placement: str = "random"

    def __post_init__(self) -> None:
        validate_style(self)

    @property
    def rgb(self) -> tuple[float, float, float]:
        return _parse_color(self.wm_color)

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["wm_color"], tuple):
            d["wm_color"] = list(d["wm_color"])
        return d


def _parse_color(color) -> tuple[float, float, float]:
    if isinstance(color, str):
        key = color.strip().lower()
        if key in _NAMED_COLORS:
            return _NAMED_COLORS[key]
        if key.startswith("#") and len(key) == 7:
            return tuple(int(key[i:i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]
        raise CNPError(
            f"unknown wm_color {color!r}; use one of {sorted(_NAMED_COLORS)}, '#rrggbb' or an RGB triple in [0, 1]"
        )
    try:
        rgb = tuple(float(c) for c in color)
    except TypeError as exc:
        raise CNPError(f"wm_color must be a name or an RGB triple, got {color!r}") from exc
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise CNPError(f"wm_color as RGB must be three numbers in [0, 1], got {color!r}")
    return rgb  # type: ignore[return-value]


def validate_style(style: WatermarkStyle) -> None:
    """Raise :class:`CNPError` for a style that cannot be rendered."""
    if not isinstance(style.wm_text, str) or not style.wm_text.strip():
        raise CNPError("wm_text must be a non-empty string")
    if not (0.05 <= float(style.wm_size) <= 0.6):
        raise CNPError(f"wm_size is the text height as a fraction of the image side; use 0.05-0.6, got {style.wm_size}")
    if not (0.0 < float(style.wm_opacity) <= 1.0):
        raise CNPError(f"wm_opacity must be in (0, 1], got {style.wm_opacity}")
    if style.wm_placement not in PLACEMENTS:
        raise CNPError(f"wm_placement must be one of {PLACEMENTS}, got {style.wm_placement!r}")
    _parse_color(style.wm_color)


@functools.lru_cache(maxsize=256)
def text_alpha(text: str, height_px: int) -> np.ndarray:
    """Anti-aliased alpha mask (float32 in [0, 1], shape (h, w)) of ``text`` about ``height_px`` tall.

    Rendered with Pillow's bundled font at 4x and downsampled (box filter).
    """
    from PIL import Image, ImageDraw, ImageFont

    height_px = max(3, int(height_px))
    scale = 4
    try:
        font = ImageFont.load_default(size=height_px * scale)
    except TypeError:  # very old Pillow without sized default font
        font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    w, h = max(1, right - left), max(1, bottom - top)
    img = Image.new("L", (w + 2 * scale, h + 2 * scale), 0)
    ImageDraw.Draw(img).text((scale - left, scale - top), text, fill=255, font=font)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    # downsample by box filter to the target height
    th = height_px + 2
    tw = max(1, int(round(arr.shape[1] * th / arr.shape[0])))
    t = torch.from_numpy(arr)[None, None]
    small = F.interpolate(t, size=(th, tw), mode="area")[0, 0].numpy()
    # trim empty borders
    rows = np.where(small.max(axis=1) > 0.02)[0]
    cols = np.where(small.max(axis=0) > 0.02)[0]
    if rows.size and cols.size:
        small = small[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return np.ascontiguousarray(np.clip(small, 0.0, 1.0))


def _fit_alpha(alpha: np.ndarray, size: int) -> np.ndarray:
    """Shrink a text alpha that is wider or taller than 90 % of the image."""
    h, w = alpha.shape
    limit = max(3, int(0.9 * size))
    if h <= limit and w <= limit:
        return alpha
    f = min(limit / h, limit / w)
    t = torch.from_numpy(alpha)[None, None]
    out = F.interpolate(t, size=(max(2, int(h * f)), max(2, int(w * f))), mode="area")[0, 0]
    return out.numpy()


def render_alpha(
    style: WatermarkStyle, n: int, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image alpha maps (n, size, size) in [0, opacity] for ``style``.

    ``fixed`` is centred; ``random`` draws a position per image (uniform where the text fits);
    ``tiled`` repeats the text on a grid with a per-image random offset.
    """
    alpha = _fit_alpha(text_alpha(style.wm_text, round(style.wm_size * size)), size)
    ah, aw = alpha.shape
    out = np.zeros((n, size, size), dtype=np.float32)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if style.wm_placement == "fixed":
        y, x = (size - ah) // 2, (size - aw) // 2
        out[:, y:y + ah, x:x + aw] = alpha
    elif style.wm_placement == "random":
        ys = torch.randint(0, size - ah + 1, (n,), generator=g).numpy()
        xs = torch.randint(0, size - aw + 1, (n,), generator=g).numpy()
        for i in range(n):
            out[i, ys[i]:ys[i] + ah, xs[i]:xs[i] + aw] = alpha
    else:  # tiled
        step_y, step_x = int(ah * 1.9) + 1, int(aw * 1.35) + 1
        big_h = size + 2 * step_y
        big_w = size + 2 * step_x
        tile = np.zeros((big_h, big_w), dtype=np.float32)
        for r, y in enumerate(range(0, big_h - ah, step_y)):
            shift = (step_x // 2) * (r % 2)
            for x in range(shift, big_w - aw, step_x):
                tile[y:y + ah, x:x + aw] = np.maximum(tile[y:y + ah, x:x + aw], alpha)
        oy = torch.randint(0, step_y, (n,), generator=g).numpy()
        ox = torch.randint(0, step_x, (n,), generator=g).numpy()
        for i in range(n):
            out[i] = tile[oy[i]:oy[i] + size, ox[i]:ox[i] + size]
    return torch.from_numpy(out) * float(style.wm_opacity)


def apply_watermark(
    images: torch.Tensor,
    style: WatermarkStyle,
    generator: torch.Generator | None = None,
    mask_threshold: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha-blend ``style`` onto float images (n, 3, H, W) in [0, 1].

    Returns
    -------
    images : torch.Tensor
        Watermarked images, same shape and dtype.
    masks : torch.Tensor
        Boolean (n, H, W): pixels where the watermark's alpha exceeds ``mask_threshold``
        times its opacity.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise CNPError(f"apply_watermark expects square RGB images (n, 3, S, S), got {tuple(images.shape)}")
    n, _, size, _ = images.shape
    a = render_alpha(style, n, size, generator).to(images.device, images.dtype)
    color = torch.tensor(style.rgb, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    out = images * (1 - a[:, None]) + color * a[:, None]
    masks = a > mask_threshold * float(style.wm_opacity)
    return out, masks


def random_text(generator: torch.Generator) -> str:
    """A random word-like watermark text: 3-9 letters (lower, upper or capitalised), sometimes
    with digits, a second word or a ``(c)`` prefix."""
    letters = "abcdefghijklmnopqrstuvwxyz"

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def word(n: int) -> str:
        return "".join(letters[randint(0, 25)] for _ in range(n))

    text = word(randint(3, 7))
    extra = randint(0, 9)
    if extra == 0:
        text += " " + word(randint(2, 5))
    elif extra == 1:
        text += str(randint(1, 999))
    case = randint(0, 2)
    text = text.upper() if case == 0 else (text.capitalize() if case == 1 else text)
    if randint(0, 4) == 0:
        text = "(c) " + text
    return text


@dataclass(frozen=True)
class StyleDistribution:
    """A distribution over watermark styles (used by the pretraining corpus).

    Each image draws its own text from ``texts``, size, opacity, colour and placement. With
    ``random_text_rate`` > 0 that share of the draws takes a random word-like text instead
    (:func:`random_text`); at 0 (the default) the recipe of a corpus is what it always was.
    """

    texts: tuple[str, ...] = ("stock", "photo", "(c) img", "pix", "PREVIEW", "foto", "getty", "shot")
    random_text_rate: float = 0.0
    sizes: tuple[float, float] = (0.14, 0.3)
    opacities: tuple[float, float] = (0.35, 0.75)
    colors: tuple[str, ...] = ("white", "white", "white", "gray", "black")
    placements: tuple[str, ...] = ("fixed", "random", "tiled")
    extra: dict = field(default_factory=dict)

    def sample(self, generator: torch.Generator) -> WatermarkStyle:
        def pick(seq):
            return seq[int(torch.randint(0, len(seq), (1,), generator=generator))]

        u = torch.rand(2, generator=generator).tolist()
        if self.random_text_rate > 0 and float(torch.rand(1, generator=generator)) < self.random_text_rate:
            text = random_text(generator)
        else:
            text = pick(self.texts)
        return WatermarkStyle(
            wm_text=text,
            wm_size=round(self.sizes[0] + u[0] * (self.sizes[1] - self.sizes[0]), 3),
            wm_opacity=round(self.opacities[0] + u[1] * (self.opacities[1] - self.opacities[0]), 3),
            wm_color=pick(self.colors),
            wm_placement=pick(self.placements),
        )


def apply_style_distribution(
    images: torch.Tensor, dist: StyleDistribution, generator: torch.Generator, group: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Watermark each image with a style drawn from ``dist`` (styles drawn per group of images)."""
    out = images.clone()
    masks = torch.zeros(images.shape[0], images.shape[2], images.shape[3], dtype=torch.bool)
    for start in range(0, images.shape[0], group):
        sl = slice(start, start + group)
        style = dist.sample(generator)
        out[sl], masks[sl] = apply_watermark(images[sl], style, generator)
    return out, masks
