"""Writes trainer/model_configs/: the architecture configs of SD 1.x, SD 2.x (512, epsilon) and SD 2.x
(768, v-prediction) as diffusers folders without weights, so single-file checkpoints load offline.

The tokenizer vocabulary is generated at run time from the CLIP BPE merges (bpe_simple_vocab_16e6.txt.gz,
from OpenAI CLIP / open_clip, MIT licence), which SD 1.x and SD 2.x share.
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "trainer" / "model_configs"

VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
UNET_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "sample_size": 64,
}
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
TEXT_SD1 = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
TEXT_SD2 = {
    **TEXT_SD1,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
TOKENIZER = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "do_lower_case": True,
}

MODELS = {
    "sd1": {
        "unet": {**UNET_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768},
        "text_encoder": TEXT_SD1,
        "tokenizer": TOKENIZER,
        "scheduler": SCHEDULER,
        "vae": VAE,
    },
    "sd2_512": {
        "unet": {
            **UNET_COMMON,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
        },
        "text_encoder": TEXT_SD2,
        "tokenizer": {**TOKENIZER, "pad_token": "!"},
        "scheduler": {**SCHEDULER, "_class_name": "DDIMScheduler", "clip_sample": False},
        "vae": VAE,
    },
    "sd2_768_v": {
        "unet": {
            **UNET_COMMON,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "sample_size": 96,
        },
        "text_encoder": TEXT_SD2,
        "tokenizer": {**TOKENIZER, "pad_token": "!"},
        "scheduler": {
            **SCHEDULER,
            "_class_name": "DDIMScheduler",
            "clip_sample": False,
            "prediction_type": "v_prediction",
        },
        "vae": {**VAE, "sample_size": 768},
    },
}
FILE_OF = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
}
LIBRARY_OF = {
    "unet": "diffusers",
    "vae": "diffusers",
    "scheduler": "diffusers",
    "text_encoder": "transformers",
    "tokenizer": "transformers",
}


def main() -> None:
    for name, parts in MODELS.items():
        folder = OUT / name
        index = {
            "_class_name": "StableDiffusionPipeline",
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
        }
        for part, config in parts.items():
            (folder / part).mkdir(parents=True, exist_ok=True)
            (folder / part / FILE_OF[part]).write_text(json.dumps(config, indent=2) + "\n")
            class_name = "CLIPTokenizer" if part == "tokenizer" else config.get("_class_name", "CLIPTextModel")
            index[part] = [LIBRARY_OF[part], class_name]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        print("wrote", folder)


if __name__ == "__main__":
    main()
