"""How much GPU memory a run will need, forecast in seconds on the CPU: no GPU, no weights, no download.

The model is built from its configs on PyTorch's meta device (tensors with a shape and a dtype and no data), and
one training forward runs on it at the run's largest bucket and batch size. The memory of a step is then:

- **weights**: every part that is on the GPU while training, the trained ones in their weight dtype (fp32 master
  weights, or bf16), the frozen ones in the mixed-precision dtype (trainer/setup.py `place_parts`); a part whose
  output is cached (the VAE with cache_latents, the text encoders with cache_text_embeddings) leaves the GPU.
- **gradients**: one per trained weight, in the weight's dtype; with the fused backward pass only one parameter's
  gradient exists at a time (optimizer/per_parameter.py frees it right after its update), so the largest one.
- **optimizer states**: counted per parameter from its shape, as each optimizer's source allocates them
  (`optimizer_state_bytes` names the file of each).
- **no fp32 master copy** is kept apart from the weights: fp32 weights are the masters, bf16 weights have none.
  With stochastic rounding the parameter being updated has an fp32 working copy (value and gradient), a line.
- **autocast copies**: with mixed precision and fp32 weights, autocast casts each weight once per forward to
  bf16/fp16 and keeps the copy in its cache until the forward ends; the backward keeps them as saved tensors.
- **activations**: the bytes of the tensors autograd saves for the backward, summed by a saved-tensors hook during
  the forward (each storage once; weights and their autocast copies left out: they are lines of their own).
  With gradient checkpointing the forward keeps only the inputs of each checkpointed block, and the backward
  recomputes one block at a time: the largest block's saved tensors are added as a line of their own.
  A frozen VAE or text encoder that runs every step (not cached) saves nothing; it runs before the UNet, so only
  the peak of its live tensors beyond the activations adds (`LivePeak`).
- **CUDA context and allocator**: a fixed allowance (CUDA_OVERHEAD_BYTES, explained there).

The total is the sum of the lines. All but the gradients are alive at the end of the forward (zero_grad(
set_to_none=True) freed the last step's gradients); the gradients appear during the backward while the activations
are freed, so the sum is a slightly high estimate of the peak. Not counted: the optimizer step's temporaries (a
few copies of the largest parameter) and the backward's in-flight gradients of activations.

Autocast does not run on meta tensors, so the forward runs under `MetaAutocast`, which applies CUDA autocast's
casting rules itself, and attention is computed with the op CUDA's scaled_dot_product_attention picks for
training (memory-efficient attention: it saves queries, keys, values, output and log-sum-exp, never the
attention matrix that the CPU's math fallback would save).
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from huggingface_hub import try_to_load_from_cache
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from data.buckets import bucket_sizes
from trainer.model import SINGLE_FILE_SUFFIXES, freeze_text_encoder_front, resolve_model_source, trained_weight_dtype
from trainer.random_model import RANDOM_MODELS, is_random_model
from trainer.single_file import BUNDLED, architecture_of, bundled_config_name
from utils.config import RANDOM_MODEL_PREFIX, ConfigError, TrainConfig, text_encoder_setting
from utils.convert import ConversionError, inspect_checkpoint
from utils.disk import GIGABYTE

# Card sizes the forecast is checked against, in GB as sold. A card of N GB has about N GiB for programs
# (nvidia-smi: 24564 MiB on a 24 GB RTX 4090, 81559 MiB on an 80 GB H100), so N GiB is taken as its memory;
# what the driver and PyTorch take of it is the CUDA line of the forecast.
CARD_SIZES_GB = (12, 16, 24, 40, 48, 80, 141)

# What a training process holds on the GPU besides its tensors, a fixed allowance: the CUDA context with PyTorch's
# kernels loaded (about 0.5 GiB with CUDA 12's lazy module loading), the cuBLAS and cuDNN workspaces (tens to a
# few hundred MiB while a convolution runs), and the caching allocator's slack (freed blocks of one size that a
# request of another size cannot reuse, a few percent of the peak). An estimate from those parts, not measured.
CUDA_OVERHEAD_BYTES = int(1.5 * GIGABYTE)

# The dtype each mixed_precision setting computes in; "auto" forecasts bf16, what every GPU since Ampere gets
# (trainer/setup.py resolve_mixed_precision).
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ForecastUnavailable(Exception):
    """The model's configs cannot be found without a download (or its forward does not run on meta tensors)."""


@dataclass(frozen=True)
class ForecastLine:
    name: str
    bytes: int


@dataclass(frozen=True)
class MemoryForecast:
    """The lines of a step's GPU memory, their total, and the card sizes it fits."""

    title: str
    lines: tuple[ForecastLine, ...]

    @property
    def total(self) -> int:
        return sum(line.bytes for line in self.lines)

    def line(self, name_start: str) -> int:
        """The bytes of the lines whose name starts with `name_start` (0 when there is none)."""
        return sum(line.bytes for line in self.lines if line.name.startswith(name_start))

    @property
    def fits(self) -> tuple[int, ...]:
        """The sizes (GB) of CARD_SIZES_GB whose memory holds the total."""
        return tuple(size for size in CARD_SIZES_GB if self.total <= size * GIGABYTE)


# ---------------------------------------------------------------------------------------------------------------
# What the run trains, and how
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """The config's memory-relevant settings, resolved."""

    compute_dtype: torch.dtype  # what autocast computes in (fp32: no autocast)
    weight_dtype: torch.dtype  # of the trained weights
    optimizer: str
    optimizer_args: dict
    betas: tuple[float, float]
    trained_parts: tuple[str, ...]  # TrainConfig.trained_parts: "unet", "text_encoder", SDXL's "text_encoder_2"
    unfrozen_layers: dict[str, int]  # trained text encoder -> its last N layers that train (all when absent)
    gradient_checkpointing: bool
    fused_backward_pass: bool
    stochastic_rounding: bool
    cache_latents: bool
    cache_text_embeddings: bool
    attn_type: str
    batch_size: int
    bucket: tuple[int, int]  # (width, height) in pixels

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != torch.float32

    @property
    def trained_text_encoders(self) -> tuple[str, ...]:
        return tuple(name for name in self.trained_parts if name != "unet")


def recipe_of(config: TrainConfig, bucket: tuple[int, int] | None = None, mixed_precision: str | None = None) -> Recipe:
    """`mixed_precision`: the resolved setting (the accelerator's), else the config's ('auto' forecasts bf16).
    `bucket`: the run's largest bucket, else the largest at the config's resolution."""
    precision = mixed_precision or config.mixed_precision
    return Recipe(
        compute_dtype=MIXED_PRECISION_DTYPES.get(precision, torch.bfloat16),
        weight_dtype=trained_weight_dtype(config),
        optimizer=config.optimizer,
        optimizer_args=dict(config.optimizer_args),
        betas=tuple(config.betas),
        trained_parts=config.trained_parts,
        unfrozen_layers={
            name: layers
            for name in config.trained_text_encoders
            if (layers := text_encoder_setting(config, name, "unfreeze_last_n_layers")) is not None
        },
        gradient_checkpointing=config.gradient_checkpointing,
        fused_backward_pass=config.fused_backward_pass,
        stochastic_rounding=config.stochastic_rounding,
        cache_latents=config.cache_latents,
        cache_text_embeddings=config.cache_text_embeddings,
        attn_type=config.attn_type,
        batch_size=config.batch_size,
        bucket=bucket or largest_bucket(bucket_sizes(config.resolution)),
    )


def largest_bucket(buckets) -> tuple[int, int]:
    """The bucket of most pixels (activations grow with the area); the squarer one of equal areas."""
    return max(buckets, key=lambda bucket: (bucket[0] * bucket[1], -abs(bucket[0] - bucket[1])))


def describe_recipe(recipe: Recipe) -> str:
    width, height = recipe.bucket
    parts = [
        f"{width}x{height}",
        f"batch {recipe.batch_size}",
        f"{DTYPE_NAMES[recipe.compute_dtype]} autocast" if recipe.autocast else "fp32 (no autocast)",
        f"{DTYPE_NAMES[recipe.weight_dtype]} weights"
        + (" + stochastic rounding" if recipe.stochastic_rounding else ""),
        recipe.optimizer,
    ]
    parts += [
        label
        for on, label in (
            (recipe.gradient_checkpointing, "gradient checkpointing"),
            (recipe.fused_backward_pass, "fused backward pass"),
            (recipe.cache_latents, "cached latents"),
            (recipe.cache_text_embeddings, "cached embeddings"),
            (not recipe.trained_text_encoders, "frozen text encoder"),
            ("text_encoder_2" in recipe.trained_text_encoders, f"trained {' and '.join(recipe.trained_text_encoders)}"),
        )
        if on
    ]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# The model's configs, found without loading weights
# ---------------------------------------------------------------------------------------------------------------


def model_config_folder(config: TrainConfig) -> Path:
    """A diffusers folder holding the configs of the model `resume_ckpt` names, found as trainer/model.py finds
    the model but without reading or converting weights: random:<name> and single files use the bundled configs of
    their architecture, a folder its own, the tiny models the folder their builder writes (small, built once), a
    hub id the copy in the local hub cache (ForecastUnavailable when it has not been downloaded yet)."""
    resume_ckpt = config.resume_ckpt
    path = Path(resume_ckpt)
    if is_random_model(resume_ckpt):
        name = resume_ckpt.removeprefix(RANDOM_MODEL_PREFIX)
        if name not in RANDOM_MODELS:
            raise ForecastUnavailable(f"'{resume_ckpt}' is no random model (valid: {', '.join(RANDOM_MODELS)})")
        return BUNDLED / RANDOM_MODELS[name]
    if path.suffix in SINGLE_FILE_SUFFIXES and not path.is_dir():
        return single_file_config_folder(path, config.single_file_config)
    source = Path(resolve_model_source(resume_ckpt, config.model_cache_dir))
    return source if source.is_dir() else hub_cache_folder(resume_ckpt)


def single_file_config_folder(path: Path, override: str | None) -> Path:
    """The configs single-file conversion uses (trainer/single_file.py): the override, else the bundled folder of
    the architecture detected from the file's keys (a .safetensors header; a .ckpt is unpickled, as its conversion
    does). SD 2.x's two folders differ only in the prediction type, which takes no memory."""
    if override:
        return Path(override)
    if not path.is_file():
        raise ConfigError(f"key 'resume_ckpt' = '{path}': no such file.")
    try:
        architecture = architecture_of(inspect_checkpoint(path))
    except ConversionError as error:
        raise ConfigError(f"key 'resume_ckpt' = '{path}': {error}") from None
    return BUNDLED / bundled_config_name(architecture, "epsilon")


# Hub models whose architecture the bundled configs are (trainer/model_configs/, the configs those models ship),
# for a forecast before their first download.
KNOWN_HUB_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1",
    "runwayml/stable-diffusion-v1-5": "sd1",
    "CompVis/stable-diffusion-v1-4": "sd1",
    "stabilityai/stable-diffusion-2-1-base": "sd2_512",
    "stabilityai/stable-diffusion-2-1": "sd2_768_v",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


def hub_cache_folder(repo_id: str) -> Path:
    """The snapshot folder of a hub model in the local hub cache, when its UNet config has been downloaded; else
    the bundled configs of a well-known model."""
    found = try_to_load_from_cache(repo_id, "unet/config.json")
    if not isinstance(found, str) and repo_id in KNOWN_HUB_MODELS:
        return BUNDLED / KNOWN_HUB_MODELS[repo_id]
    if not isinstance(found, str):
        raise ForecastUnavailable(
            f"the configs of hub model '{repo_id}' are not downloaded yet, and the forecast does not download; "
            f"the first run does"
        )
    return Path(found).parent.parent


def text_encoder_classes(folder: Path) -> dict[str, type]:
    """Subfolder -> transformers class of each text encoder (text_encoder, text_encoder_2 for SDXL), from
    model_index.json; a folder without one (just unet/ and the others) has SD's single CLIPTextModel."""
    index = folder / "model_index.json"
    if not index.is_file():
        return {"text_encoder": transformers.CLIPTextModel}
    entries = json.loads(index.read_text(encoding="utf-8"))
    return {
        name: getattr(transformers, value[1])
        for name, value in sorted(entries.items())
        if name.startswith("text_encoder") and isinstance(value, list) and value[1]
    }


@dataclass
class MetaModel:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # by subfolder name

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders}


def build_meta_model(folder: Path) -> MetaModel:
    """The UNet, VAE and text encoders of `folder`'s configs on the meta device, in fp32 (no memory, no weights).
    A folder whose configs cannot be read gives no forecast (loading the model says what is wrong with it)."""
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text_encoders = {
                name: model_class(transformers.AutoConfig.from_pretrained(folder / name))
                for name, model_class in text_encoder_classes(folder).items()
            }
    except (OSError, ValueError, AttributeError) as error:
        raise ForecastUnavailable(f"the model configs in {folder} cannot be read ({error})") from None
    return MetaModel(unet, vae, text_encoders)


def on_gpu_part_names(model: MetaModel, recipe: Recipe) -> list[str]:
    """The parts on the GPU while training: a part whose output is cached leaves it (trainer/cache.py)."""
    names = ["unet"] + ([] if recipe.cache_latents else ["vae"])
    return names + [name for name in model.text_encoders if not recipe.cache_text_embeddings]


def configure_meta_model(model: MetaModel, recipe: Recipe) -> None:
    """Dtypes and requires_grad as trainer/setup.py places them and trainer/model.py configures them: trained parts
    in the weight dtype, frozen ones in the compute dtype."""
    trained = recipe.trained_parts
    for name, part in model.parts().items():
        part.requires_grad_(name in trained)
        part.train(name in trained)
        part.to(recipe.weight_dtype if name in trained else recipe.compute_dtype)
    for name, layers in recipe.unfrozen_layers.items():
        if name in model.text_encoders:
            freeze_text_encoder_front(model.text_encoders[name], layers)
    if recipe.attn_type == "slice":
        model.unet.set_attention_slice("auto")  # the attention matrix of each slice is saved for the backward


# ---------------------------------------------------------------------------------------------------------------
# Autocast and attention on meta tensors
# ---------------------------------------------------------------------------------------------------------------

# CUDA autocast's op lists (https://pytorch.org/docs/stable/amp.html, "CUDA Ops that can autocast to float16" and
# "... to float32"), for the functions SD's UNet, VAE and CLIP call (the others of the lists take no large tensors
# here). Autocast casts at the aten level, below these functions and above autograd, so the casts are recorded and
# the saved tensors are the cast copies: the same happens when the casts are made before these functions run.
LOWER_PRECISION_FUNCTIONS = frozenset(
    {
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        F.linear,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.bmm,
        torch.Tensor.bmm,
        torch.baddbmm,
        torch.Tensor.baddbmm,
        torch.addmm,
        F.scaled_dot_product_attention,
    }
)
FP32_FUNCTIONS = frozenset(
    {
        F.group_norm,
        F.layer_norm,
        F.softmax,
        torch.softmax,
        torch.Tensor.softmax,
        F.log_softmax,
        F.mse_loss,
        torch.exp,
        torch.Tensor.exp,
        torch.pow,
        torch.Tensor.pow,
        torch.rsqrt,
        torch.Tensor.rsqrt,
    }
)


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """scaled_dot_product_attention as CUDA trains it: the memory-efficient kernel (flash attention saves the same
    tensors), which saves queries, keys, values, output and log-sum-exp for its backward. A boolean mask becomes the
    additive bias that kernel takes."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), float("-inf")
        )
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    output = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
    )
    return output[0]


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast's casts, made before the function runs (autocast itself does nothing on meta tensors), and
    attention as CUDA computes it. As autocast does, the low-precision copy of a weight (an fp32 leaf that requires
    grad) is made once and cached until the forward ends: `weight_copies` holds them."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight_copies: dict[int, torch.Tensor] = {}
        self.copy_storages: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype != torch.float32 and func in LOWER_PRECISION_FUNCTIONS:
            args, kwargs = self.cast_all(args, kwargs, torch.float32, self.dtype)
        elif self.dtype != torch.float32 and func in FP32_FUNCTIONS:
            args, kwargs = self.cast_all(args, kwargs, self.dtype, torch.float32)
        if func is F.scaled_dot_product_attention:
            return efficient_attention(*args, **kwargs)
        return func(*args, **kwargs)

    def cast_all(self, args, kwargs, source: torch.dtype, target: torch.dtype):
        def cast(value):
            if not isinstance(value, torch.Tensor) or value.dtype != source:
                return value
            if target == self.dtype and value.is_leaf and value.requires_grad:  # autocast caches only these casts
                if id(value) not in self.weight_copies:
                    self.weight_copies[id(value)] = copy = value.to(target)
                    self.copy_storages.add(storage_key(copy))
                return self.weight_copies[id(value)]
            return value.to(target)

        return tuple(cast(value) for value in args), {key: cast(value) for key, value in kwargs.items()}

    @property
    def copies_bytes(self) -> int:
        return sum(storage_bytes(copy) for copy in self.weight_copies.values())


# ---------------------------------------------------------------------------------------------------------------
# Counting what the forward keeps
# ---------------------------------------------------------------------------------------------------------------


def storage_key(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage: views share it. Meta tensors have no data pointer to compare, so the
    storage object's own (the C++ StorageImpl's address) is used."""
    return tensor.untyped_storage()._cdata


def storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


class SavedTensorCounter:
    """Sums the bytes of the distinct storages autograd saves for the backward while `counting()` is on, leaving
    out the storages in the sets of `excluded` (weights, their autocast copies: lines of their own; the sets may
    grow while counting). Saved tensors are kept referenced until the counter goes, so that no storage (and its
    identity) is reused while counting."""

    def __init__(self, excluded: tuple[set[int], ...]):
        self.excluded = excluded
        self.seen: dict[int, torch.Tensor] = {}

    def add(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key not in self.seen and not any(key in storages for storages in self.excluded):
            self.seen[key] = tensor

    @property
    def bytes(self) -> int:
        return sum(storage_bytes(tensor) for tensor in self.seen.values())

    @contextmanager
    def counting(self) -> Iterator[SavedTensorCounter]:
        def pack(tensor):
            self.add(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield self


class CheckpointRecorder:
    """Takes the place of torch.utils.checkpoint in the forecast's forward, measuring what checkpointing keeps.

    Non-reentrant checkpointing (what diffusers and transformers use) runs a block's forward with a saved-tensors
    hook that keeps nothing, and holds on to the block's inputs to run it again in the backward: during the forward
    a checkpointed block costs its inputs (added to `kept`, the forward's own counter, each storage once). In the
    backward the block is recomputed, its saved tensors exist until its own backward is done, and blocks are
    recomputed one at a time: `largest_block` is the most that recomputation adds at any moment. Here the block
    runs once, under a counter of its own (the innermost saved-tensors hook wins), so the forward's counter does
    not see its inside."""

    def __init__(self, kept: SavedTensorCounter):
        self.kept = kept
        self.largest_block = 0

    def __call__(self, function, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                self.kept.add(value)
        block = SavedTensorCounter(self.kept.excluded)
        with block.counting():
            output = function(*args, **kwargs)
        self.largest_block = max(self.largest_block, block.bytes)
        return output


def checkpoint_with(module: torch.nn.Module, recorder: CheckpointRecorder) -> None:
    """Gradient checkpointing as the trainer enables it (trainer/model.py), each checkpoint taken by `recorder`.
    diffusers takes the function as an argument; transformers keeps it, as diffusers does, in each checkpointed
    module's `_gradient_checkpointing_func`, which is set here after its own enabling."""
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing(recorder)
        return
    module.activation_checkpointing_enable()
    for submodule in module.modules():
        if getattr(submodule, "gradient_checkpointing", False):
            submodule._gradient_checkpointing_func = recorder


class LivePeak(TorchDispatchMode):
    """The most bytes of tensors alive at once in a forward without gradients (the VAE encode, a frozen text
    encoder): each new storage an op makes is counted while its tensor lives. An op's output that is a view of its
    input makes no storage. Tensors made before the mode started are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if not any(result.alias_info is not None for result in func._schema.returns):
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(tensor, torch.Tensor):
                    self.allocated(tensor)
        return output

    def allocated(self, tensor: torch.Tensor) -> None:
        size = storage_bytes(tensor)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self.freed, size)

    def freed(self, size: int) -> None:
        self.live -= size


# ---------------------------------------------------------------------------------------------------------------
# The forward passes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    saved: dict[str, int]  # part -> bytes saved for the backward (with checkpointing: what the forward keeps)
    recomputed_block: int  # with checkpointing: the largest block's saved tensors, alive during its recompute
    autocast_copies: int
    encode_peak: int  # the most alive at once while the frozen parts encode (VAE, text encoders), before the UNet


def latent_shape(model: MetaModel, recipe: Recipe) -> tuple[int, int, int, int]:
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)  # 8 for every SD VAE
    width, height = recipe.bucket
    return (recipe.batch_size, model.unet.config.in_channels, height // factor, width // factor)


def token_ids(encoder: torch.nn.Module, batch_size: int) -> torch.Tensor:
    return torch.zeros(batch_size, encoder.config.max_position_embeddings, dtype=torch.long, device="meta")


def run_text_encoder(encoder: torch.nn.Module, batch_size: int):
    # output_hidden_states: SDXL conditions on the second-to-last layer, and clip_skip picks an earlier one.
    return encoder(token_ids(encoder, batch_size), output_hidden_states=True)


def unet_conditioning(model: MetaModel, recipe: Recipe, dtype: torch.dtype, trained: list[str]) -> dict:
    """The UNet's inputs besides the latents, in its dtype (as trainer/diffusion.py gives them): the text hidden
    states and, for SDXL, the pooled text embedding and the size/crop ids. They require grad when the text encoder
    whose output they are trains (the hidden states: any; the pooled embedding: SDXL's second)."""
    config, batch = model.unet.config, recipe.batch_size
    hidden = torch.empty(batch, 77, config.cross_attention_dim, device="meta", dtype=dtype)
    inputs = {"encoder_hidden_states": hidden.requires_grad_(any(name in trained for name in model.text_encoders))}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled_embeds = torch.empty(batch, pooled, device="meta", dtype=dtype)
        inputs["added_cond_kwargs"] = {
            "text_embeds": pooled_embeds.requires_grad_("text_encoder_2" in trained),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    return inputs


def encode_peak(model: MetaModel, recipe: Recipe) -> int:
    """The frozen parts that run every step (the VAE without cached latents, frozen text encoders without cached
    embeddings) run without gradients, before the UNet: what they hold is their live tensors' peak."""
    run_vae = not recipe.cache_latents
    trained = recipe.trained_parts
    frozen_encoders = [] if recipe.cache_text_embeddings else [n for n in model.text_encoders if n not in trained]
    peak = 0
    with torch.no_grad(), MetaAutocast(recipe.compute_dtype):
        if run_vae:
            with LivePeak() as tracker:
                width, height = recipe.bucket
                pixels = torch.empty(recipe.batch_size, 3, height, width, device="meta")
                parameters = model.vae.encode(pixels.to(recipe.compute_dtype)).latent_dist.parameters
                latents = DiagonalGaussianDistribution(parameters).sample()
                del pixels, parameters, latents
            peak = tracker.peak
        for name in frozen_encoders:
            with LivePeak() as tracker:
                run_text_encoder(model.text_encoders[name], recipe.batch_size)
            peak = max(peak, tracker.peak)
    return peak


def measure_activations(model: MetaModel, recipe: Recipe) -> Activations:
    """One training forward (trained text encoders, the UNet, the loss) on meta tensors, counting what it saves."""
    weights = {storage_key(tensor) for part in model.parts().values() for tensor in part.state_dict().values()}
    autocast = MetaAutocast(recipe.compute_dtype)
    excluded = (weights, autocast.copy_storages)

    trained = recipe.trained_parts
    saved: dict[str, int] = {}
    largest_block = 0
    outputs = []  # the graphs stay alive (and with them the saved tensors) until everything is counted
    with autocast:
        for name in [name for name in model.text_encoders if name in trained]:
            counter, recorder = SavedTensorCounter(excluded), None
            if recipe.gradient_checkpointing:
                recorder = CheckpointRecorder(counter)
                checkpoint_with(model.text_encoders[name], recorder)
            with counter.counting():
                outputs.append(run_text_encoder(model.text_encoders[name], recipe.batch_size))
            saved[name] = counter.bytes
            largest_block = max(largest_block, recorder.largest_block if recorder else 0)
        counter, recorder = SavedTensorCounter(excluded), None
        if recipe.gradient_checkpointing:
            recorder = CheckpointRecorder(counter)
            checkpoint_with(model.unet, recorder)
        with counter.counting():
            latents = torch.empty(latent_shape(model, recipe), device="meta")
            timesteps = torch.zeros(recipe.batch_size, dtype=torch.long, device="meta")
            unet_dtype = next(model.unet.parameters()).dtype
            conditioning = unet_conditioning(model, recipe, unet_dtype, trained)
            # As trainer/diffusion.py denoising_loss: the UNet gets its own dtype, the loss compares in fp32.
            prediction = model.unet(latents.to(unet_dtype), timesteps, **conditioning).sample
            outputs.append(F.mse_loss(prediction.float(), latents))
        saved["unet"] = counter.bytes
        largest_block = max(largest_block, recorder.largest_block if recorder else 0)
    return Activations(saved, largest_block, autocast.copies_bytes, encode_peak(model, recipe))


# ---------------------------------------------------------------------------------------------------------------
# Weights, gradients, optimizer states
# ---------------------------------------------------------------------------------------------------------------

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes/optim/optimizer.py: smaller parameters keep fp32 states
BNB_BLOCK_SIZE = 256  # ... and each block of 256 values of an 8-bit state has one fp32 absmax


def bnb_state_bytes(numel: int, states: int) -> int:
    """bitsandbytes 8-bit optimizers (Optimizer1State / Optimizer2State.init_state): one uint8 per value and state,
    plus an fp32 absmax per block of 256; below 4096 values, fp32 states."""
    if numel < BNB_MIN_8BIT_SIZE:
        return states * 4 * numel
    blocks = -(-numel // BNB_BLOCK_SIZE)
    return states * (numel + 4 * blocks)


def adafactor_state_bytes(shape: torch.Size, beta1) -> int:
    """transformers.optimization.Adafactor.step: states in fp32 (it computes on grad.float()); a parameter of 2 or
    more dimensions keeps factored second moments (shape[:-1] row sums and shape[:-2] + shape[-1:] column sums),
    others the full exp_avg_sq; exp_avg only with beta1 (off by default)."""
    numel = shape.numel()
    if len(shape) >= 2:
        second = shape[:-1].numel() + (shape[:-2] + shape[-1:]).numel()
    else:
        second = numel
    return 4 * (second + (numel if beta1 is not None else 0))


def optimizer_state_bytes(parameter: torch.Tensor, recipe: Recipe) -> int:
    """The state one parameter's optimizer allocates. State dtypes follow the parameter (torch's zeros_like) except
    where noted; with stochastic rounding every optimizer steps an fp32 copy (optimizer/stochastic_rounding.py
    fp32_working_copy), so its states are fp32. Scalars (step counters) are left out."""
    numel = parameter.numel()
    size = 4 if recipe.stochastic_rounding else parameter.element_size()
    args = recipe.optimizer_args
    if recipe.optimizer == "adamw8bit":
        return bnb_state_bytes(numel, 2)
    if recipe.optimizer == "lion8bit":
        return bnb_state_bytes(numel, 1)
    if recipe.optimizer == "adafactor":
        return adafactor_state_bytes(parameter.shape, args.get("beta1"))
    if recipe.optimizer == "prodigy":  # prodigyopt/prodigy.py: s and p0 (every slice_p-th value), exp_avg, exp_avg_sq
        sliced = -(-numel // args.get("slice_p", 1))
        first_moment = numel if recipe.betas[0] > 0 else 0
        return size * (2 * sliced + first_moment + numel)
    if recipe.optimizer == "coordinate_dowg":  # dowg/CoordinateDoWG.py: x0, rt2, vt, all fp32
        return 3 * 4 * numel
    full_states = {
        "adamw": 2,  # torch/optim/adamw.py: exp_avg, exp_avg_sq
        "lion": 1,  # lion_pytorch/lion_pytorch.py: exp_avg
        "dadapt_adam": 3,  # dadaptation/dadapt_adam.py: s, exp_avg, exp_avg_sq
        "dadapt_lion": 2,  # dadaptation/dadapt_lion.py: exp_avg, s
        "dadapt_sgd": 3,  # dadaptation/dadapt_sgd.py: z, s, x0
    }
    return full_states[recipe.optimizer] * size * numel


def trained_parameters(model: MetaModel, recipe: Recipe) -> list[torch.Tensor]:
    return [p for name in recipe.trained_parts for p in model.parts()[name].parameters() if p.requires_grad]


def part_bytes(part: torch.nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in part.state_dict().values())


def weight_lines(model: MetaModel, recipe: Recipe) -> list[ForecastLine]:
    trained = recipe.trained_parts
    lines = []
    for name in on_gpu_part_names(model, recipe):
        part = model.parts()[name]
        dtype = DTYPE_NAMES[next(part.parameters()).dtype]
        lines.append(
            ForecastLine(f"weights: {name} ({'trained' if name in trained else 'frozen'}, {dtype})", part_bytes(part))
        )
    return lines


def training_state_lines(model: MetaModel, recipe: Recipe) -> list[ForecastLine]:
    """Gradients, optimizer states and, with stochastic rounding, the fp32 copy of the parameter being updated."""
    parameters = trained_parameters(model, recipe)
    if not parameters:
        return []
    gradients = [p.numel() * p.element_size() for p in parameters]
    largest = max(parameters, key=lambda p: p.numel())
    lines = [
        ForecastLine("gradients (fused backward: the largest one at a time)", max(gradients))
        if recipe.fused_backward_pass
        else ForecastLine("gradients", sum(gradients)),
        ForecastLine(
            f"optimizer states ({recipe.optimizer})", sum(optimizer_state_bytes(p, recipe) for p in parameters)
        ),
    ]
    if recipe.stochastic_rounding:
        # fp32_working_copy: the value and the gradient of one parameter in fp32 while it steps.
        lines.append(ForecastLine("fp32 working copy (stochastic rounding, one parameter)", 8 * largest.numel()))
    return lines


# ---------------------------------------------------------------------------------------------------------------
# The forecast
# ---------------------------------------------------------------------------------------------------------------


def forecast_memory(
    config: TrainConfig, bucket: tuple[int, int] | None = None, mixed_precision: str | None = None
) -> MemoryForecast:
    """The memory forecast of `config`'s run at `bucket` (default: the largest at its resolution). Raises
    ForecastUnavailable when the model's configs are not on this machine, ConfigError for a bad resume_ckpt."""
    folder = model_config_folder(config)
    recipe = recipe_of(config, bucket, mixed_precision)
    return forecast_for_model(build_meta_model(folder), recipe, f"{config.resume_ckpt} ({describe_recipe(recipe)})")


def forecast_for_model(model: MetaModel, recipe: Recipe, title: str) -> MemoryForecast:
    configure_meta_model(model, recipe)
    try:
        activations = measure_activations(model, recipe)
    except (RuntimeError, NotImplementedError) as error:  # an architecture with an op that has no meta kernel
        raise ForecastUnavailable(f"the model's forward does not run on meta tensors ({error})") from None
    lines = weight_lines(model, recipe) + training_state_lines(model, recipe)
    if activations.autocast_copies:
        lines.append(ForecastLine("autocast copies of the fp32 weights", activations.autocast_copies))
    for name, size in activations.saved.items():
        lines.append(ForecastLine(f"activations: {name}", size))
    if recipe.gradient_checkpointing:
        lines.append(ForecastLine("activations: recomputed block (checkpointing)", activations.recomputed_block))
    # The encode runs before the UNet's forward, when no activations exist: only what it holds beyond them adds.
    training_activations = sum(activations.saved.values()) + activations.recomputed_block
    beyond = activations.encode_peak - training_activations
    if beyond > 0:
        lines.append(ForecastLine("frozen encode (VAE / text encoder) beyond the activations", beyond))
    lines.append(ForecastLine("CUDA context and allocator (fixed allowance)", CUDA_OVERHEAD_BYTES))
    return MemoryForecast(title, tuple(line for line in lines if line.bytes > 0))


def format_forecast(forecast: MemoryForecast) -> str:
    """The forecast as a console table, in GiB, with the card sizes it fits."""
    width = max(len(line.name) for line in forecast.lines) + 2
    rows = [f"memory forecast: {forecast.title}"]
    rows += [f"  {line.name:<{width}}{line.bytes / GIGABYTE:8.2f} GiB" for line in forecast.lines]
    rows.append(f"  {'total':<{width}}{forecast.total / GIGABYTE:8.2f} GiB")
    too_small = [size for size in CARD_SIZES_GB if size not in forecast.fits]
    fits = ", ".join(f"{size}" for size in forecast.fits)
    rows.append(
        f"  fits cards of {fits} GB" + (f" (not {', '.join(map(str, too_small))} GB)" if too_small else "")
        if forecast.fits
        else f"  fits none of the cards of {', '.join(map(str, CARD_SIZES_GB))} GB"
    )
    return "\n".join(rows)


def run_start_report(config: TrainConfig, buckets, accelerator) -> list[str]:
    """The forecast in the start report of a run (trainer/setup.py), at the largest of the run's buckets, for the
    precision the accelerator resolved. Only a GPU run on its main process forecasts: on the CPU the memory is the
    machine's RAM and no card size applies, and the other processes would compute the same table unsaid."""
    if accelerator.device.type != "cuda" or not accelerator.is_main_process:
        return []
    return forecast_report(config, largest_bucket(set(buckets)), accelerator.mixed_precision)


def forecast_report(
    config: TrainConfig, bucket: tuple[int, int] | None = None, mixed_precision: str | None = None
) -> list[str]:
    """The forecast table's lines for the console, or one line saying why there is none."""
    started = time.perf_counter()
    try:
        forecast = forecast_memory(config, bucket, mixed_precision)
    except ForecastUnavailable as reason:
        return [f"memory forecast: none ({reason})"]
    seconds = time.perf_counter() - started
    return [*format_forecast(forecast).splitlines(), f"  (forecast in {seconds:.1f} s on meta tensors)"]
