"""Generate the demo training set: 20 small, procedurally drawn scenes with captions.

    python scripts/make_demo_data.py [--out demo/data]

The output is deterministic (fixed scene list, shape placement from a seeded generator),
so re-running it reproduces the committed files. Most images are 96x96; two are 128x96 and
two 96x128 so that resolutions above 64 exercise several aspect buckets. Captions come
from .txt sidecars, except for one .caption sidecar and one file-name caption
("a green square_001.png"), which exercise the other two caption rules.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "demo" / "data"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SKIN = (230, 190, 150)
RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
SQUARE, LANDSCAPE, PORTRAIT = (96, 96), (128, 96), (96, 128)


@dataclass(frozen=True)
class Scene:
    file_stem: str
    shape: str  # circle, square, triangle or person
    color: str
    background: str
    size: tuple[int, int] = SQUARE
    caption_file: str | None = ".txt"  # None: the caption comes from the file name

    @property
    def caption(self) -> str:
        if self.shape == "person":
            subject = f"a person in {self.color} clothes"
        else:
            subject = f"{_article(self.color)} {self.color} {self.shape}"
        return f"{subject} on {_article(self.background)} {self.background} background"


SCENES = [
    Scene("scene01", "circle", "red", "blue"),
    Scene("scene02", "square", "blue", "yellow"),
    Scene("scene03", "triangle", "yellow", "purple"),
    Scene("scene04", "circle", "green", "white"),
    Scene("scene05", "square", "orange", "black"),
    Scene("scene06", "triangle", "purple", "green"),
    Scene("scene07", "circle", "white", "red"),
    Scene("scene08", "square", "black", "orange"),
    Scene("scene09", "triangle", "red", "white"),
    Scene("scene10", "circle", "blue", "green"),
    Scene("scene11", "person", "blue", "white"),
    Scene("scene12", "person", "green", "blue"),
    Scene("scene13", "circle", "yellow", "black"),
    Scene("scene14", "triangle", "orange", "blue"),
    Scene("scene15", "square", "red", "green", caption_file=".caption"),
    Scene("a green square_001", "square", "green", "white", caption_file=None),
    Scene("scene17", "circle", "purple", "yellow", size=LANDSCAPE),
    Scene("scene18", "person", "red", "yellow", size=LANDSCAPE),
    Scene("scene19", "person", "orange", "green", size=PORTRAIT),
    Scene("scene20", "triangle", "blue", "orange", size=PORTRAIT),
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", scene.size, COLORS[scene.background])
    width, height = scene.size
    # The shape fills 40-60 % of the short side, placed anywhere it fits.
    extent = int(min(width, height) * rng.uniform(0.4, 0.6))
    left = rng.randint(4, width - extent - 4)
    top = rng.randint(4, height - extent - 4)
    box = (left, top, left + extent, top + extent)
    DRAWERS[scene.shape](ImageDraw.Draw(image), box, COLORS[scene.color])
    return image


def _draw_circle(draw: ImageDraw.ImageDraw, box: Box, color: RGB) -> None:
    draw.ellipse(box, fill=color)


def _draw_square(draw: ImageDraw.ImageDraw, box: Box, color: RGB) -> None:
    draw.rectangle(box, fill=color)


def _draw_triangle(draw: ImageDraw.ImageDraw, box: Box, color: RGB) -> None:
    left, top, right, bottom = box
    draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=color)


def _draw_person(draw: ImageDraw.ImageDraw, box: Box, color: RGB) -> None:
    """A stick figure: round head, a body in the clothes colour, arms and legs."""
    left, top, right, bottom = box
    unit = (bottom - top) / 10
    middle = (left + right) / 2
    draw.ellipse((middle - 1.5 * unit, top, middle + 1.5 * unit, top + 3 * unit), fill=SKIN)
    body = (middle - 1.5 * unit, top + 3 * unit, middle + 1.5 * unit, top + 7 * unit)
    draw.rectangle(body, fill=color)
    limb = max(1, round(unit / 2))
    draw.line((middle - 1.5 * unit, top + 3.5 * unit, left, top + 6 * unit), fill=SKIN, width=limb)
    draw.line((middle + 1.5 * unit, top + 3.5 * unit, right, top + 6 * unit), fill=SKIN, width=limb)
    draw.line((middle - unit, top + 7 * unit, middle - 2 * unit, bottom), fill=SKIN, width=limb)
    draw.line((middle + unit, top + 7 * unit, middle + 2 * unit, bottom), fill=SKIN, width=limb)


DRAWERS = {
    "circle": _draw_circle,
    "square": _draw_square,
    "triangle": _draw_triangle,
    "person": _draw_person,
}


def write_demo_data(out: Path) -> list[Path]:
    """Write every scene (image plus caption sidecar) into out; returns the image paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, scene in enumerate(SCENES):
        image_path = out / f"{scene.file_stem}.png"
        draw_scene(scene, random.Random(index)).save(image_path, optimize=True)
        if scene.caption_file is not None:
            caption_path = out / f"{scene.file_stem}{scene.caption_file}"
            caption_path.write_text(scene.caption + "\n", encoding="utf-8")
        written.append(image_path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: demo/data)")
    args = parser.parse_args()
    written = write_demo_data(args.out)
    print(f"wrote {len(written)} images to {args.out}")


if __name__ == "__main__":
    main()
