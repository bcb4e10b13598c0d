"""Model architectures written out as configs, so models can be built without any download.

``TINY``: random-weight models of the same classes as the real ones, small enough to build,
train and run on two CPU cores in seconds (tests, CI, offline smoke runs).
``SD15``: the real sizes of SD 1.5 (UNet, VAE, CLIP ViT-L/14 text encoder), BLIP-base and a
SegFormer-b0; built with random weights they expose size-dependent bugs (768-wide
cross-attention, 77-token prompts, VAE scaling factor, LoRA target names, memory) where no GPU
and no real weights exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Stable Diffusion's noise schedule (the scheduler config shipped with SD 1.5).
SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "skip_prk_steps": True,
}


@dataclass(frozen=True)
class Architecture:
    """Configs for every model of a preset. Vision sizes are in pixels."""

    name: str
    resolution: int  # pixels the diffusion model trains and generates at
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # CLIPTextConfig kwargs (vocab filled from the tokenizer)
    blip_vision: dict[str, Any]
    blip_text: dict[str, Any]
    blip_image_size: int
    segformer: dict[str, Any]
    segmenter_size: int
    clip_vision: dict[str, Any]
    clip_text: dict[str, Any]
    clip_image_size: int
    dino: dict[str, Any]
    dino_image_size: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER))


_TINY_ATTN = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}

TINY = Architecture(
    name="tiny",
    resolution=64,
    unet={
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
    },
    vae={
        "block_out_channels": [32, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "sample_size": 64,
    },
    text_encoder={
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "max_position_embeddings": 77,
        "projection_dim": 32,
    },
    blip_vision={**_TINY_ATTN, "image_size": 32, "patch_size": 8},
    blip_text={**_TINY_ATTN, "encoder_hidden_size": 32, "max_position_embeddings": 64},
    blip_image_size=32,
    segformer={
        "depths": [1, 1, 1, 1],
        "hidden_sizes": [8, 16, 32, 64],
        "num_attention_heads": [1, 1, 2, 4],
        "decoder_hidden_size": 32,
    },
    segmenter_size=64,
    clip_vision={**_TINY_ATTN, "image_size": 32, "patch_size": 8},
    clip_text={**_TINY_ATTN, "max_position_embeddings": 77},
    clip_image_size=32,
    dino={**_TINY_ATTN, "image_size": 32, "patch_size": 8},
    dino_image_size=32,
)

SD15 = Architecture(
    name="sd15",
    resolution=512,
    unet={
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    vae={
        "block_out_channels": [128, 256, 512, 512],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    text_encoder={
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    blip_vision={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "image_size": 384, "patch_size": 16},
    blip_text={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "encoder_hidden_size": 768},
    blip_image_size=384,
    segformer={
        "depths": [2, 2, 2, 2],
        "hidden_sizes": [32, 64, 160, 256],
        "num_attention_heads": [1, 2, 5, 8],
        "decoder_hidden_size": 256,
    },
    segmenter_size=512,
    clip_vision={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "image_size": 224, "patch_size": 32},
    clip_text={"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
               "intermediate_size": 2048, "max_position_embeddings": 77},
    clip_image_size=224,
    dino={"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
          "intermediate_size": 1536, "image_size": 224, "patch_size": 16},
    dino_image_size=224,
)

ARCHITECTURES = {"tiny": TINY, "sd15": SD15}
