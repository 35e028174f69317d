"""Generate the demo training set: 20 drawn images of "a zorb", a concept `tiny-pretrained` has never seen.

    python scripts/make_demo_data.py [--out demo/data] [--concept zorb]

A zorb is a thick blue ring. `tiny-pretrained` (docs/tiny-models.md) was trained on filled circles, squares
and triangles on the same white, gray and black backgrounds (plain, striped, checkered, speckled); it has
never seen a ring, nor the word "zorb" (nor a "z"). The ring's blue is the base's own, because the base's
frozen VAE can only draw its palette colours: the new thing is the shape, a disc with a hole. Fine-tuning on
these images teaches it what "a zorb" is. Captions follow the base's wording: "a zorb on a striped gray
background", "a zorb at the top left on a black background".

`--concept quib` draws a second new concept the same way: "a quib", a thick yellow plus sign (bench/lr_finder_check.py
checks the LR finder on both).

The output is deterministic (fixed scene list, jitter from generators seeded by the scene's index), so
re-running it reproduces the committed files. Each scene is drawn at 64-px scale onto a square, the size of
the image's short side: most images are 96x96; two are 128x96 and two 96x128 (the background extends past
the square, which a 64 px bucket crops off) so that resolutions above 64 exercise several aspect buckets.
Captions come from .txt sidecars, except for one .caption sidecar and one file-name caption
("a zorb_001.png"), which exercise the other two caption rules.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "demo" / "data"

SCALE = 64  # the scene is laid out in pixels of a 64 px image, the base model's size
SUPERSAMPLE = 4  # the ring is drawn this much larger, then box-filtered down: smooth edges


@dataclass(frozen=True)
class Concept:
    word: str  # the new word of the captions and of the file-name caption
    rgb: tuple[int, int, int]  # one of tiny-pretrained's colours (scripts/pretrain_tiny.py COLOURS)
    shape: str  # "ring" or "plus": shapes the base has never seen


CONCEPTS = {
    "zorb": Concept("zorb", (40, 75, 220), "ring"),  # a thick blue ring: the demo's
    "quib": Concept("quib", (235, 200, 40), "plus"),  # a thick yellow plus sign
}
DEFAULT_CONCEPT = "zorb"
OUTER_RADIUS = (17, 21)  # pixels at 64 px scale, drawn from this range
HOLE_FRACTION = 0.5  # the hole's radius over the ring's
BAR_FRACTION = 0.45  # the plus sign's bar width over its span
GREY_LEVELS = {"white": 232, "gray": 128, "black": 28}  # the base's backgrounds
TEXTURE_CONTRAST = 22  # the base's brightness step of stripes, checks and speckles
ROWS = {"top": -12, "": 0, "bottom": 12}  # centre offsets at 64 px scale, as the base's positions
COLUMNS = {"left": -12, "": 0, "right": 12}
JITTER = 2  # pixels at 64 px scale, added to the centre
DRAW_SEED_STEP = 100  # the jitter seed of scene i in draw d is i + 100 d: every draw's seeds differ from the first's
SQUARE, LANDSCAPE, PORTRAIT = (96, 96), (128, 96), (96, 128)


@dataclass(frozen=True)
class Scene:
    file_stem: str
    background: str  # white, gray or black
    texture: str = "plain"  # plain, striped, checkered or speckled
    row: str = ""  # top, bottom or "" (the middle)
    column: str = ""  # left, right or "" (the middle)
    size: tuple[int, int] = SQUARE
    caption_file: str | None = ".txt"  # None: the caption comes from the file name

    def caption(self, word: str) -> str:
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"a {word}{position_phrase(self.row, self.column)} on a {texture}{self.background} background"

    def stem(self, word: str) -> str:
        """The file name without its suffix, the concept's word in the file-name caption ("a zorb_001")."""
        return self.file_stem.replace(DEFAULT_CONCEPT, word)


SCENES = [
    Scene("scene01", "gray"),
    Scene("scene02", "white", "striped", "top", "left"),
    Scene("scene03", "black", row="bottom", column="right"),
    Scene("scene04", "gray", "checkered", column="left"),
    Scene("scene05", "white"),
    Scene("scene06", "black", "speckled", "top"),
    Scene("scene07", "gray", "striped", "bottom", "left"),
    Scene("scene08", "white", "checkered", column="right"),
    Scene("scene09", "black", "striped"),
    Scene("scene10", "gray", "speckled", "top", "right"),
    Scene("scene11", "white", row="bottom"),
    Scene("scene12", "black", "checkered", "top", "left"),
    Scene("scene13", "gray", row="top"),
    Scene("scene14", "white", "speckled", "bottom", "right"),
    Scene("scene15", "black", column="left", caption_file=".caption"),
    Scene("a zorb_001", "gray", "striped", caption_file=None),
    Scene("scene17", "white", "striped", size=LANDSCAPE),
    Scene("scene18", "black", row="bottom", size=LANDSCAPE),
    Scene("scene19", "gray", "checkered", column="right", size=PORTRAIT),
    Scene("scene20", "white", "speckled", "top", size=PORTRAIT),
]


def position_phrase(row: str, column: str) -> str:
    """The base's wording: " at the top left", " on the left", "" for the centre."""
    if row:
        return f" at the {' '.join(part for part in (row, column) if part)}"
    return f" on the {column}" if column else ""


def background_levels(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """[height, width] grey levels: the background's level, its texture as brightness steps towards mid-grey."""
    width, height = scene.size
    level = GREY_LEVELS[scene.background]
    sign = -1 if level > 128 else 1
    period = int(rng.integers(4, 9)) * min(width, height) // SCALE
    y, x = np.mgrid[0:height, 0:width]
    if scene.texture == "striped":
        pattern = (x // period) % 2
    elif scene.texture == "checkered":
        pattern = (x // period + y // period) % 2
    elif scene.texture == "speckled":
        pattern = rng.random((height, width)) < 0.3
    else:
        pattern = np.zeros((height, width))
    return level + sign * TEXTURE_CONTRAST * pattern.astype(np.float32)


def shape_alpha(scene: Scene, shape: str, rng: np.random.Generator) -> np.ndarray:
    """[height, width] coverage in [0, 1] of the concept's shape (a ring or a plus sign), centred in the image's
    central square."""
    width, height = scene.size
    unit = min(width, height) / SCALE * SUPERSAMPLE  # canvas pixels per 64-px-scale pixel
    outer = rng.uniform(*OUTER_RADIUS) * unit
    centre_x = width * SUPERSAMPLE / 2 + (COLUMNS[scene.column] + rng.uniform(-JITTER, JITTER)) * unit
    centre_y = height * SUPERSAMPLE / 2 + (ROWS[scene.row] + rng.uniform(-JITTER, JITTER)) * unit
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "ring":
        for radius, fill in ((outer, 255), (outer * HOLE_FRACTION, 0)):
            draw.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=fill)
    else:
        bar = outer * BAR_FRACTION
        draw.rectangle((centre_x - outer, centre_y - bar, centre_x + outer, centre_y + bar), fill=255)
        draw.rectangle((centre_x - bar, centre_y - outer, centre_x + bar, centre_y + outer), fill=255)
    return np.asarray(canvas.resize(scene.size, Image.Resampling.BOX), dtype=np.float32) / 255


def draw_scene(scene: Scene, concept: Concept, rng: np.random.Generator) -> Image.Image:
    """The concept's shape composited over the scene's background."""
    background = background_levels(scene, rng)[..., None]
    alpha = shape_alpha(scene, concept.shape, rng)[..., None]
    pixels = background * (1 - alpha) + np.array(concept.rgb, dtype=np.float32) * alpha
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def write_demo_data(out: Path, concept: str = DEFAULT_CONCEPT, draws: int = 1) -> list[Path]:
    """Write every scene (image plus caption sidecar) of `concept` into out; returns the image paths. `draws` > 1
    draws every scene again with other jitter, the copies named <stem>_2, <stem>_3, ... (a larger set of the same
    concept, for bench/lr_finder_check.py --draws)."""
    drawn = CONCEPTS[concept]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for draw in range(draws):
        for index, scene in enumerate(SCENES):
            stem = scene.stem(drawn.word) + (f"_{draw + 1}" if draw else "")
            image_path = out / f"{stem}.png"
            jitter = np.random.default_rng(index + DRAW_SEED_STEP * draw)
            draw_scene(scene, drawn, jitter).save(image_path, optimize=True)
            if scene.caption_file is not None:
                (out / f"{stem}{scene.caption_file}").write_text(scene.caption(drawn.word) + "\n", encoding="utf-8")
            written.append(image_path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: demo/data)")
    parser.add_argument("--concept", choices=list(CONCEPTS), default=DEFAULT_CONCEPT)
    parser.add_argument("--draws", type=int, default=1, help="draw every scene this many times (default 1: 20 images)")
    args = parser.parse_args()
    written = write_demo_data(args.out, args.concept, args.draws)
    print(f"wrote {len(written)} images to {args.out}")


if __name__ == "__main__":
    main()
