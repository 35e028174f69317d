"""Pretrain `tiny-pretrained`: a small SD 1.x-style model that draws coloured shapes on command, trained on the CPU.

    python scripts/pretrain_tiny.py --out models/tiny-pretrained --seed 0

The data set is drawn here, procedurally: one shape (circle, square, triangle) of one of five colours, of three
sizes, at nine positions, on a neutral background (white, gray, black) that is plain, striped, checkered or
speckled, 64 px, with a caption that names the colour and the shape and, each time at random, some of the rest
("a large red circle at the top left on a striped gray background", "a red circle"). Then, in order:

1. the VAE (SD's 8x downsampling AutoencoderKL, small) learns to reconstruct the images;
2. the images are encoded once; the VAE's scaling factor is set so the latents have unit variance, as SD's is;
3. the UNet and the text encoder (a small CLIP over trainer/tiny_model.py's character-level tokenizer) learn the
   denoising objective together (trainer/diffusion.py denoising_loss, min-SNR weighted), captions dropped 10% of
   the time so that classifier-free guidance works; the weights saved are an exponential moving average of theirs
   (diffusers' EMAModel);
4. samples of a fixed prompt set ("a red circle", ...) are measured by `describe` (dominant colour, bounding-box
   fill ratio), as tests/test_pretrained_tiny.py does with the saved model.

The folder is an ordinary diffusers StableDiffusionPipeline folder (fp32 safetensors) plus manifest.json: the
sha256 of every file, the seed, the script version and the training figures. The same seed, torch version and
thread count give the same weights. `--vae-from FOLDER` takes the VAE of an earlier run instead of training one (to
try UNet settings in less time); with the VAE that the same seed and VAE options train, it gives the same weights
as a full run, as the UNet phase draws from its own generator.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

SCRIPT_VERSION = "2"
MANIFEST = "manifest.json"
SIZE = 64  # image side, pixels
SUPERSAMPLE = 4  # shapes are drawn this much larger, then box-filtered down: smooth edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (230, 205, 30),
    "green": (40, 170, 55),
    "blue": (40, 75, 220),
    "purple": (150, 50, 205),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (18, 24), "medium": (26, 34), "large": (36, 44)}  # side, pixels
BACKGROUNDS: dict[str, int] = {"white": 232, "gray": 128, "black": 28}  # grey level
TEXTURES = ("plain", "striped", "checkered", "speckled")
ROWS = {"top": -12, "": 0, "bottom": 12}  # centre offsets, pixels
COLUMNS = {"left": -12, "": 0, "right": 12}
COLOUR_JITTER = 12  # per channel, so the model learns a hue, not one RGB value
GREY_JITTER = 10
TEXTURE_CONTRAST = 22  # brightness step of stripes, checks and speckles: neutral, far below a shape's chroma

# The measure (describe): every background is neutral (chroma, max - min channel, 0 before decoding), every shape
# colour has chroma >= 130. A pixel belongs to the shape when its chroma is above half the image's peak chroma
# (its 99th percentile; the smallest shape covers 6% of the image): half-way up a blurred edge is where the sharp
# edge was. An image whose peak chroma is below MIN_PEAK_CHROMA shows no coloured shape.
PEAK_PERCENTILE = 99
MIN_PEAK_CHROMA = 80
MIN_SHAPE_PIXELS = 30
LATENT_CHANNELS = 4  # SD's
SHAPE_LOSS_WEIGHT = 5.0  # the VAE's reconstruction loss on the shape's pixels, relative to the background's
# Bounding-box fill ratios: square 1, circle pi/4 = 0.785, triangle (apex up, base down) 1/2; the boundaries sit
# halfway between.
FILL_BOUNDARIES = ((0.64, "triangle"), (0.89, "circle"), (math.inf, "square"))

EVAL_PROMPTS = tuple(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)
EVAL_SEEDS = (0, 1)
EVAL_STEPS = 20
EVAL_GUIDANCE = 6.0
EVAL_SCHEDULER = "ddim"  # a trainer/sampling.py build_scheduler name
# The manifest records the accuracy at each: how much it hangs on EVAL_GUIDANCE.
GUIDANCE_SWEEP = (4.0, 6.0, 7.5, 8.0, 10.0)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    row: str
    column: str
    background: str
    texture: str

    def caption(self, rng: np.random.Generator) -> str:
        """The colour and the shape always; the size, the position and the background each half the time."""
        words = ["a"]
        if rng.random() < 0.5:
            words.append(self.size)
        words += [self.colour, self.shape]
        position = " ".join(part for part in (self.row, self.column) if part)
        if rng.random() < 0.5:
            words.append(position_phrase(self.row, self.column, position))
        if rng.random() < 0.5:
            texture = "" if self.texture == "plain" and rng.random() < 0.5 else f"{self.texture} "
            words.append(f"on a {texture}{self.background} background")
        return " ".join(words)


def position_phrase(row: str, column: str, position: str) -> str:
    if not position:
        return "in the centre"
    if row:
        return f"at the {position}"
    return f"on the {position}"


def random_scene(rng: np.random.Generator) -> Scene:
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    return Scene(
        colour=pick(list(COLOURS)),
        shape=pick(SHAPES),
        size=pick(list(SIZES)),
        row=pick(list(ROWS)),
        column=pick(list(COLUMNS)),
        background=pick(list(BACKGROUNDS)),
        texture=pick(TEXTURES),
    )


def background_image(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """[SIZE, SIZE] grey levels: the background's level, with its texture as brightness steps."""
    level = BACKGROUNDS[scene.background] + rng.integers(-GREY_JITTER, GREY_JITTER + 1)
    sign = -1 if level > 128 else 1  # textures step towards mid-grey, never out of range
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(4, 9))
    if scene.texture == "striped":
        pattern = ((x if rng.random() < 0.5 else y) // period) % 2
    elif scene.texture == "checkered":
        pattern = ((x // period) + (y // period)) % 2
    elif scene.texture == "speckled":
        pattern = rng.random((SIZE, SIZE)) < 0.3
    else:
        pattern = np.zeros((SIZE, SIZE))
    return level + sign * TEXTURE_CONTRAST * pattern.astype(np.float32)


def shape_alpha(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """[SIZE, SIZE] coverage in [0, 1] of the scene's shape, drawn supersampled."""
    low, high = SIZES[scene.size]
    side = int(rng.integers(low, high + 1))
    half = side / 2
    centre = [
        np.clip(SIZE / 2 + offset + rng.integers(-3, 4), half + 1, SIZE - half - 1)
        for offset in (COLUMNS[scene.column], ROWS[scene.row])
    ]
    s = SUPERSAMPLE
    left, top, right, bottom = (
        (centre[0] - half) * s,
        (centre[1] - half) * s,
        (centre[0] + half) * s,
        (centre[1] + half) * s,
    )
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=255)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    small = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


def draw_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """[SIZE, SIZE, 3] uint8: the shape composited over its background."""
    background = background_image(scene, rng)[..., None].repeat(3, axis=2)
    colour = np.array(COLOURS[scene.colour], dtype=np.float32) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    alpha = shape_alpha(scene, rng)[..., None]
    return np.clip(background * (1 - alpha) + colour * alpha, 0, 255).round().astype(np.uint8)


def make_dataset(count: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`count` images [N, SIZE, SIZE, 3] uint8 and their scenes, from one seeded generator."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    return np.stack([draw_scene(scene, rng) for scene in scenes]), scenes


# ---------------------------------------------------------------------------------------------------------------
# The measure: what a decoded image shows
# ---------------------------------------------------------------------------------------------------------------


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of uint8 RGB pixels [..., 3] (PIL's HSV conversion)."""
    flat = rgb.reshape(-1, 1, 3).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(flat, "RGB").convert("HSV"))
    return hsv[..., 0].reshape(rgb.shape[:-1]).astype(np.float64) * 360 / 256


COLOUR_HUES = {name: float(hue_degrees(np.array(rgb, dtype=np.uint8))) for name, rgb in COLOURS.items()}


def shape_mask(image: np.ndarray) -> np.ndarray:
    """The shape's pixels: those of high chroma (the backgrounds are neutral); none when nothing is coloured."""
    channels = image.astype(np.int16)
    chroma = channels.max(axis=2) - channels.min(axis=2)
    peak = np.percentile(chroma, PEAK_PERCENTILE)
    if peak < MIN_PEAK_CHROMA:
        return np.zeros(chroma.shape, dtype=bool)
    return chroma > peak / 2


def dominant_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour nearest (on the hue circle) to the circular mean hue of the masked pixels."""
    angles = np.radians(hue_degrees(image[mask]))
    mean = math.degrees(math.atan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360
    distance = {name: abs((hue - mean + 180) % 360 - 180) for name, hue in COLOUR_HUES.items()}
    return min(distance, key=distance.get)


def fill_ratio(mask: np.ndarray) -> float:
    """The mask's share of its bounding box; rows and columns with a single pixel (speckle) do not widen it."""
    rows, columns = np.flatnonzero(mask.sum(axis=1) >= 2), np.flatnonzero(mask.sum(axis=0) >= 2)
    if not len(rows) or not len(columns):
        return 0.0
    box = mask[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    return float(box.mean())


def shape_from_fill(fill: float) -> str:
    return next(shape for boundary, shape in FILL_BOUNDARIES if fill < boundary)


def describe(image: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) an image [H, W, 3] uint8 shows, or (None, None) when it shows no coloured shape."""
    mask = shape_mask(image)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return None, None
    return dominant_colour(image, mask), shape_from_fill(fill_ratio(mask))


def prompt_samples(pipeline, prompts=EVAL_PROMPTS, seeds=EVAL_SEEDS, guidance: float = EVAL_GUIDANCE) -> list[tuple]:
    """(prompt, seed, image [H, W, 3] uint8) for every prompt with every seed, as prompt_accuracy reads them.
    `pipeline`: a StableDiffusionPipeline on the CPU, its scheduler set by the caller."""
    import torch

    samples = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        images = pipeline(
            list(prompts),
            num_inference_steps=EVAL_STEPS,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            generator=generator,
            output_type="np",
        ).images
        samples += [
            (prompt, seed, (image * 255).round().astype(np.uint8))
            for prompt, image in zip(prompts, images, strict=True)
        ]
    return samples


def sample_record(prompt: str, seed: int, image: np.ndarray) -> dict:
    """What `describe` reads in the sample of "a <colour> <shape>", and whether that is what was asked."""
    _, colour, shape = prompt.split()
    seen = describe(image)
    return {"prompt": prompt, "seed": seed, "seen": list(seen), "right": seen == (colour, shape)}


def prompt_accuracy(
    pipeline, prompts=EVAL_PROMPTS, seeds=EVAL_SEEDS, guidance: float = EVAL_GUIDANCE
) -> tuple[float, list[dict]]:
    """The share of samples (each prompt "a <colour> <shape>" with each seed) that `describe` reads as asked, and
    one record per sample."""
    records = [sample_record(*sample) for sample in prompt_samples(pipeline, prompts, seeds, guidance)]
    return sum(record["right"] for record in records) / len(records), records


# ---------------------------------------------------------------------------------------------------------------
# The model and its training
# ---------------------------------------------------------------------------------------------------------------


def build_components(folder: Path):
    """The untrained model: VAE, UNet, text encoder, tokenizer (its files written under `folder`), scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from trainer.tiny_model import tiny_text_config, tiny_tokenizer

    text_width = 64
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    start_with_small_posterior_noise(vae)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # Cross-attention at both levels: the text decides colour (everywhere) and shape (at 4x4, the whole shape).
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        tiny_text_config(hidden_size=text_width, intermediate_size=2 * text_width, projection_dim=text_width)
    )
    scheduler = DDPMScheduler(  # SD 1.5's noise schedule (as trainer/tiny_model.py's tiny)
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return vae, unet, text_encoder, tiny_tokenizer(folder), scheduler


def start_with_small_posterior_noise(vae, logvar: float = -8.0) -> None:
    """The encoder's log-variance starts at `logvar` instead of about 0. At 0 the sampled latents carry noise of
    std 1, larger than their means, and a short training learns blended colours and blurred shapes before it
    learns to shrink that noise; the KL term (weight 1e-6) moves it only slowly either way."""
    import torch

    channels = vae.config.latent_channels
    with torch.no_grad():  # quant_conv's output is (mean, logvar) on the channel axis
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = logvar


def to_pixels(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], as the VAE takes them."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def shape_weights(pixels):
    """[B, 1, H, W] loss weights: SHAPE_LOSS_WEIGHT on the shape's pixels (high chroma), 1 on the background. The
    shape is a sixth of an image or less, the background's texture most of its error; the model needs the shape."""
    chroma = pixels.amax(dim=1, keepdim=True) - pixels.amin(dim=1, keepdim=True)
    return 1 + (SHAPE_LOSS_WEIGHT - 1) * (chroma > MIN_PEAK_CHROMA / 127.5).float()


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, generator) -> float:
    """Shape-weighted reconstruction (L1 + MSE) with SD's tiny KL weight; returns the mean loss of the last 50
    steps."""
    import torch
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in (bar := tqdm(range(steps), desc="VAE", file=sys.stdout)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 50)
        pixels = to_pixels(images[torch.randint(len(images), (batch,), generator=generator).numpy()])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        error = reconstruction - pixels
        pixel_loss = (shape_weights(pixels) * (error.abs() + error.square())).mean()
        loss = pixel_loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return float(np.mean(losses[-50:]))


def encode_all(vae, images: np.ndarray, batch: int = 256):
    """The VAE's latent distribution parameters (mean, logvar) of every image."""
    import torch

    with torch.no_grad():
        chunks = [images[start : start + batch] for start in range(0, len(images), batch)]
        return torch.cat([vae.encode(to_pixels(chunk)).latent_dist.parameters for chunk in chunks])


def reconstructions(vae, images: np.ndarray) -> np.ndarray:
    """The VAE's decoded means of `images`, uint8."""
    import torch

    with torch.no_grad():
        decoded = vae.decode(vae.encode(to_pixels(images)).latent_dist.mode()).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def measure_accuracy(images: np.ndarray, scenes: list[Scene]) -> float:
    """The share of images `describe` reads as their scenes' colour and shape."""
    right = [describe(image) == (scene.colour, scene.shape) for image, scene in zip(images, scenes, strict=True)]
    return float(np.mean(right))


def denoiser_parameters(model) -> list:
    return list(model.unet.parameters()) + list(model.text_encoder.parameters())


def train_denoiser(
    model, latent_parameters, scenes: list[Scene], steps: int, batch: int, lr: float, ema_decay: float, seed: int
):
    """UNet and text encoder together on the epsilon objective (min-SNR 5); 10% of captions dropped for
    classifier-free guidance. Returns the mean loss of the last 100 steps and the EMA of the weights (diffusers'
    EMAModel, its decay warming up as (1 + step) / (10 + step) to `ema_decay`): the average of the last
    ~1 / (1 - ema_decay) steps' weights draws cleaner shapes than the last step's alone."""
    import torch
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    from trainer.diffusion import denoising_loss, sample_cached_latents
    from trainer.model import encode_prompts

    # Its own generators, so that this phase draws the same whether the VAE was trained or loaded (--vae-from).
    generator = torch.Generator().manual_seed(seed + 2)
    caption_rng = np.random.default_rng(seed + 1)
    parameters = denoiser_parameters(model)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    ema = EMAModel(parameters, decay=ema_decay, foreach=True)
    model.unet.train()
    model.text_encoder.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="UNet + text encoder", file=sys.stdout)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 100)
        picked = torch.randint(len(scenes), (batch,), generator=generator)
        captions = [
            "" if caption_rng.random() < 0.1 else scenes[index].caption(caption_rng) for index in picked.tolist()
        ]
        latents = sample_cached_latents(latent_parameters[picked], model.vae_scale, "cpu")
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        hidden = encode_prompts(model, captions, clip_skip=0, device="cpu")
        loss = denoising_loss(model, latents, hidden, noise, timesteps, min_snr_gamma=5.0).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.step(parameters)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    model.unet.eval()
    model.text_encoder.eval()
    return float(np.mean(losses[-100:])), ema


def write_manifest(folder: Path, figures: dict) -> dict:
    """manifest.json: the sha256 of every file in the model folder, and how it was made."""
    from utils.checkpoint import file_sha256

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = figures | {"sha256": {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


VAE_WEIGHTS = Path("vae") / "diffusion_pytorch_model.safetensors"  # in a folder this script (diffusers) wrote


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-pretrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=6000, help="training images drawn")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=24)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--vae-from", type=Path, help="a folder this script wrote: take its VAE, train none")
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="peak of the cosine schedule")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the weights depend on it)")
    args = parser.parse_args(argv)
    if args.vae_from is not None and not (args.vae_from / VAE_WEIGHTS).is_file():
        parser.error(
            f"--vae-from {args.vae_from}: no {VAE_WEIGHTS.as_posix()} there. Give a folder this script wrote "
            "(models/tiny-pretrained, or an --out of an earlier run), or leave --vae-from out to train the VAE."
        )
    return args


def vae_phase(vae, images: np.ndarray, args, generator) -> dict:
    """Train the VAE, or load the one of --vae-from; returns the manifest's figures of it."""
    if args.vae_from is not None:
        from safetensors.torch import load_file

        # The file's tensors, not from_pretrained: it builds a model, which draws from the global generator.
        vae.load_state_dict(load_file(args.vae_from / VAE_WEIGHTS))
        vae.eval()
        return {"from": str(args.vae_from)}
    loss = train_vae(vae, images, args.vae_steps, args.vae_batch, args.vae_lr, generator)
    vae.eval()
    return {"steps": args.vae_steps, "batch": args.vae_batch, "lr": args.vae_lr, "final_loss": round(loss, 5)}


def sampling_pipeline(model):
    """The pipeline that prompt_accuracy takes: the model's components with EVAL_SCHEDULER, no progress bar."""
    from trainer.sampling import build_scheduler

    pipeline = model.pipeline(build_scheduler(EVAL_SCHEDULER, model.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main(argv=None) -> int:
    import torch

    from trainer.model import SDModel, load_pretrained
    from trainer.tiny_model import save_sd_folder
    from utils.checkpoint import atomic_path

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.monotonic()
    timings = {}

    images, scenes = make_dataset(args.images, args.seed)
    held_out_images, held_out_scenes = make_dataset(200, args.seed + 10_000)
    print(f"{len(images)} images drawn, {time.monotonic() - started:.0f}s")

    with atomic_path(args.out) as folder:
        vae, unet, text_encoder, tokenizer, scheduler = build_components(folder / "tokenizer")
        phase = time.monotonic()
        vae_figures = vae_phase(vae, images, args, generator)
        timings["vae_s"] = round(time.monotonic() - phase)
        vae_measure = measure_accuracy(reconstructions(vae, held_out_images), held_out_scenes)
        print(f"the measure reads {vae_measure:.0%} of held-out VAE reconstructions right")

        latent_parameters = encode_all(vae, images)
        # Of the means: the sampled latents' own noise is negligible (start_with_small_posterior_noise).
        latent_std = float(latent_parameters[:, :LATENT_CHANNELS].std())
        vae.register_to_config(scaling_factor=round(1 / latent_std, 5))

        model = SDModel(unet, vae, text_encoder, tokenizer, scheduler, source=str(args.out))
        phase = time.monotonic()
        denoiser_loss, ema = train_denoiser(
            model, latent_parameters, scenes, args.unet_steps, args.unet_batch, args.unet_lr, args.ema_decay, args.seed
        )
        timings["unet_text_encoder_s"] = round(time.monotonic() - phase)
        # The last step's weights, measured for the manifest only: the EMA is what is saved.
        accuracy_without_ema, _ = prompt_accuracy(sampling_pipeline(model))
        ema.copy_to(denoiser_parameters(model))

        save_sd_folder(folder, unet, vae, text_encoder, tokenizer, scheduler)

        # Measured on the saved folder, loaded as a run loads it.
        sampler = sampling_pipeline(load_pretrained(str(folder), str(args.out)))
        accuracy, records = prompt_accuracy(sampler)
        by_guidance = {str(guidance): prompt_accuracy(sampler, guidance=guidance)[0] for guidance in GUIDANCE_SWEEP}
        timings["total_s"] = round(time.monotonic() - started)
        figures = {
            "script": "scripts/pretrain_tiny.py",
            "script_version": SCRIPT_VERSION,
            "seed": args.seed,
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "images": args.images,
            "vae": vae_figures,
            "latent_std": round(latent_std, 5),
            "unet_text_encoder": {
                "steps": args.unet_steps,
                "batch": args.unet_batch,
                "lr": args.unet_lr,
                "ema_decay": args.ema_decay,
                "final_loss": round(denoiser_loss, 5),
            },
            "measure_on_training_images": measure_accuracy(held_out_images, held_out_scenes),
            "measure_on_vae_reconstructions": vae_measure,
            "prompt_guidance": EVAL_GUIDANCE,
            "prompt_accuracy": accuracy,
            "prompt_accuracy_without_ema": accuracy_without_ema,
            "prompt_accuracy_by_guidance": by_guidance,
            "prompt_samples": records,
            "seconds": timings,
        }
        manifest = write_manifest(folder, figures)
    shown = {key: value for key, value in manifest.items() if key not in ("sha256", "prompt_samples")}
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
