"""Deterministic synthetic text lines (and pages) for judging text recognizers and detectors.

No labelled text images ship with the PaddleOCR models, so the evaluation renders its own:
short English-like lines (words, numbers, prices, dates, codes) drawn with Pillow's
``ImageDraw`` in the TTF fonts found on the machine, with varied size, weight, colours,
contrast, blur and noise. Everything random comes from ``numpy.random.default_rng(seed)``,
so one seed gives the same pixels byte for byte on one machine (fonts and FreeType fixed).

The texts use only characters that both the model's alphabet and every font can draw
(``charset``); the difficulty is set so that the float PP-OCRv6 recognizer reads nearly all
lines (see docs/ocr.md): the harness judges a quantizer, not the model. ``render_pages``
pastes such lines onto pages for the text detector.
"""

from __future__ import annotations

import io
import itertools
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .errors import UserError

FONT_DIRS = (Path("/usr/share/fonts"),)  # searched recursively (Debian: truetype/dejavu/)
# Faces too unlike body text (math symbols, hairline weights) would test the font, not the model.
_SKIP_FACES = ("Math", "ExtraLight", "Display")
PUNCTUATION = ".,:;-!?'\"()/%&+#@$"
WORDS = """the of and to in is for on with as by at from this that are be or an it not can
new all more one two three time year data model image text line page price total date
order number invoice street road city north south east west open close room floor level
office phone email name first last address account balance amount tax paid due week
month today hotel station airport train bus ticket gate seat class menu coffee tea water
bread cheese apple orange market store sale free best quality service center public
school library museum park garden river bridge tower house home main exit entry parking
please thank you welcome hello world quick brown fox jumps over lazy dog small large
red green blue black white light dark left right up down stop go slow fast speed limit
version system error check input output value result report table figure section""".split()


def font_paths() -> list[Path]:
    """Sorted DejaVu TTFs under /usr/share/fonts, else matplotlib's bundled copies; UserError."""
    for folder in FONT_DIRS:
        found = sorted(p for p in folder.rglob("DejaVu*.ttf") if not _skipped(p))
        if found:
            return found
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        folder = Path(matplotlib.__file__).resolve().parent / "mpl-data" / "fonts" / "ttf"
        found = sorted(p for p in folder.glob("DejaVu*.ttf") if not _skipped(p))
        if found:
            return found
    raise UserError("no TTF font found for rendering text lines; install fonts-dejavu-core "
                    "(apt) or matplotlib (pip)")


def _skipped(path: Path) -> bool:
    return any(tag in path.name for tag in _SKIP_FACES)


def _has_glyph(font: ImageFont.FreeTypeFont, char: str) -> bool:
    """True when ``char`` draws something other than the font's missing-glyph box."""
    missing = font.getmask("\ue000")  # private-use code point: no DejaVu glyph
    mask = font.getmask(char)
    return mask.size != missing.size or bytes(mask) != bytes(missing)


@lru_cache(maxsize=None)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def charset(alphabet: Sequence[str] | None = None, fonts: Sequence[Path] | None = None) -> str:
    """Letters, digits and common punctuation that every font draws and ``alphabet`` holds."""
    wanted = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
              + PUNCTUATION)
    keep = set(wanted) if alphabet is None else set(wanted) & set(alphabet)
    for path in fonts or font_paths():
        font = _font(str(path), 32)
        keep = {c for c in keep if _has_glyph(font, c)}
    return "".join(c for c in wanted if c in keep)


def random_text(rng: np.random.Generator, chars: str) -> str:
    """One line of 3..25 characters: words, numbers, prices, dates or codes, space-separated."""
    kind = str(rng.choice(["words", "words", "words", "mixed", "numbers", "code"]))
    target = int(rng.integers(3, 26))
    pieces: list[str] = []
    while len(" ".join(pieces)) < target:
        piece = _piece(rng, kind)
        if pieces and len(" ".join(pieces + [piece])) > 25:
            break
        pieces.append(piece)
    text = "".join(c for c in " ".join(pieces)[:25] if c in chars or c == " ").strip()
    return text if len(text) >= 3 else "abc"


def _piece(rng: np.random.Generator, kind: str) -> str:
    if kind == "words" or (kind == "mixed" and rng.random() < 0.6):
        word = _word(rng)
        if rng.random() < 0.15:
            word += str(rng.choice(list(".,:;!?")))
        return word
    if kind == "code":
        alnum = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/1/O/0: ambiguous in any font
        n = int(rng.integers(3, 8))
        return "".join(rng.choice(list(alnum), n)) + ("-" + str(rng.integers(10, 999))
                                                      if rng.random() < 0.5 else "")
    return _number(rng)


def _word(rng: np.random.Generator) -> str:
    word = str(rng.choice(WORDS))
    style = rng.random()
    if style < 0.25:
        return word.capitalize()
    if style < 0.35:
        return word.upper()
    return word


def _number(rng: np.random.Generator) -> str:
    form = int(rng.integers(0, 7))
    if form == 0:
        return str(int(rng.integers(0, 100000)))
    if form == 1:
        return f"${rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
    if form == 2:
        return f"{rng.integers(2000, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if form == 3:
        return f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    if form == 4:
        return f"{rng.integers(1, 100)}%"
    if form == 5:
        return f"({rng.integers(100, 1000)}) {rng.integers(100, 1000)}-{rng.integers(1000, 10000)}"
    return f"#{rng.integers(1, 500)}"


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """(2 x 3 RGB ends of the background gradient, ink RGB); contrast >= ~60 grey levels."""
    background = rng.integers(130, 256, (2, 3))
    ink = rng.integers(0, 60, 3) + rng.integers(0, 60)
    if rng.random() < 0.15:  # light text on a dark background
        background, ink = 255 - background, 255 - ink
    return background, tuple(int(v) for v in ink)


def _canvas(size: tuple[int, int], ends: np.ndarray) -> Image.Image:
    """Horizontal gradient between the two background colours."""
    t = np.linspace(0.0, 1.0, size[0])[None, :, None]
    row = (1 - t) * ends[0] + t * ends[1]
    pixels = np.broadcast_to(row, (size[1], size[0], 3))
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


def _degrade(rng: np.random.Generator, image: Image.Image, fill) -> Image.Image:
    """Small rotation, blur, Gaussian noise and JPEG artefacts, each drawn at random."""
    if rng.random() < 0.2:
        image = image.rotate(float(rng.uniform(-2, 2)), Image.BILINEAR, expand=True,
                             fillcolor=fill)
    blur = float(rng.uniform(0.0, 1.4))
    if blur > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, np.float32)
    pixels = pixels + rng.normal(0.0, float(rng.uniform(0, 12)), pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(rng.integers(30, 90)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def render_line(rng: np.random.Generator, text: str, fonts: Sequence[Path]) -> Image.Image:
    """``text`` on a tight gradient canvas, then degraded; RGB."""
    font = _font(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(14, 44)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = rng.integers(2, 16, 2), rng.integers(2, 10, 2)
    size = (int(right - left + pad_x.sum()), int(bottom - top + pad_y.sum()))
    ends, ink = _colours(rng)
    image = _canvas(size, ends)
    ImageDraw.Draw(image).text((int(pad_x[0] - left), int(pad_y[0] - top)), text,
                               font=font, fill=ink)
    return _degrade(rng, image, tuple(int(v) for v in ends[0]))


def render_lines(n: int, seed: int, alphabet: Sequence[str] | None = None
                 ) -> list[tuple[Image.Image, str]]:
    """``n`` (image, text) pairs, identical for identical (n, seed, alphabet, fonts)."""
    return list(itertools.islice(iter_lines(seed, alphabet), n))


def iter_lines(seed: int, alphabet: Sequence[str] | None = None
               ) -> Iterator[tuple[Image.Image, str]]:
    """(image, text) pairs without end; the first n are ``render_lines(n, seed, alphabet)``."""
    fonts = font_paths()
    chars = charset(alphabet, fonts)
    rng = np.random.default_rng(seed)
    while True:
        text = random_text(rng, chars)
        yield render_line(rng, text, fonts), text


def render_pages(n: int, seed: int, size: tuple[int, int] = (800, 600),
                 alphabet: Sequence[str] | None = None
                 ) -> list[tuple[Image.Image, list[tuple[int, int, int, int]]]]:
    """``n`` pages of rendered lines pasted in rows; each with its (x0, y0, x1, y1) boxes."""
    fonts = font_paths()
    chars = charset(alphabet, fonts)
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(n):
        page = _canvas(size, rng.integers(190, 256, (2, 3)))
        boxes, y = [], int(rng.integers(10, 40))
        while True:
            line = render_line(rng, random_text(rng, chars), fonts)
            x = int(rng.integers(10, max(11, size[0] - line.width - 10)))
            if y + line.height > size[1] - 10 or x + line.width > size[0]:
                break
            page.paste(line, (x, y))
            boxes.append((x, y, x + line.width, y + line.height))
            y += line.height + int(rng.integers(8, 40))
        pages.append((page, boxes))
    return pages
