"""Random-weight model zoos built from :mod:`pipeline.architectures`, with no network.

``build_zoo(root, TINY)`` writes every model the product uses with ``save_pretrained`` in the
same layout as the real checkpoints, so :mod:`pipeline.models` loads them through exactly the
code path that loads the real ones. Tokenizers are built from a small word list.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.architectures import Architecture
from pipeline.storage.files import file_lock

ZOO_VERSION = 1
_MARKER = "zoo.json"
# Words the tiny tokenizers know as whole tokens; everything else falls back to characters.
WORDS = tuple(
    (
        "a an the of in on with and at is are this that photo picture sticker stickers telegram "
        "cartoon drawing style emoji cat dog person man woman boy girl child baby face smiling "
        "smile happy sad angry cute funny red blue green yellow black white orange pink purple "
        "brown gray background wearing shirt hat glasses holding standing sitting looking "
        "camera car tree flower sky water beach house street table cup food pizza coffee bird "
        "fish horse bear robot character animal toy ball book phone dress hair "
    ).split()
)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        # Left-to-right merges spell each word as one token: ("c","a"), ("ca","t</w>").
        pieces = [*word[:-1], word[-1] + "</w>"]
        acc = pieces[0]
        for piece in pieces[1:]:
            merged = acc + piece
            if (acc, piece) not in merges:
                merges.append((acc, piece))
            vocab.setdefault(merged, len(vocab))
            acc = merged
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def build_clip_tokenizer(max_length: int = 77):  # -> CLIPTokenizer
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5 accepts merge pairs; its annotation lists only strings.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


def build_bert_tokenizer():  # -> BertTokenizer
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab_list = specials + list(WORDS) + letters + ["##" + c for c in letters]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = BertTokenizer(vocab=vocab, model_max_length=64)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def build_safety_checker(vision: dict[str, Any], *, projection_dim: int = 32, flags: bool = False):
    """A random-weight ``StableDiffusionSafetyChecker`` (the class SD 1.5 ships) from a CLIP vision
    config. Its concept thresholds decide what it does: ``flags=False`` never flags an image,
    ``flags=True`` flags every one (a cosine similarity lies in [-1, 1]; the threshold is put
    outside that range), so tests can drive both branches without real weights."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                     "num_hidden_layers": 1},
                        vision_config=vision, projection_dim=projection_dim)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        threshold = -2.0 if flags else 2.0
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    return checker.eval()


def build_diffusion_pipeline(arch: Architecture, *, safety_checker: Any = None,
                             feature_extractor: Any = None):  # -> StableDiffusionPipeline
    """Random-weight SD components of ``arch`` in a ``StableDiffusionPipeline`` (not saved)."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    unet = UNet2DConditionModel(**arch.unet)
    vae = AutoencoderKL(**arch.vae)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch.text_encoder,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler.from_config(arch.scheduler)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=safety_checker is not None,
    )


def save_diffusion(arch: Architecture, out: Path) -> None:
    pipe = build_diffusion_pipeline(arch)
    pipe.save_pretrained(out)


def save_blip(arch: Architecture, out: Path) -> None:
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = build_bert_tokenizer()
    text = dict(arch.blip_text)
    text.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = BlipConfig(text_config=text, vision_config=arch.blip_vision,
                        projection_dim=arch.blip_vision["hidden_size"])
    model = BlipForConditionalGeneration(config)
    size = arch.blip_image_size
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def save_segformer(arch: Architecture, out: Path) -> None:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    # num_labels and the label maps are PretrainedConfig kwargs the stubs do not list.
    config = SegformerConfig(num_labels=1, id2label={0: "foreground"},  # type: ignore[call-arg]
                             label2id={"foreground": 0}, **arch.segformer)
    model = SegformerForSemanticSegmentation(config)
    size = arch.segmenter_size
    processor = SegformerImageProcessor(size={"height": size, "width": size}, do_reduce_labels=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def save_clip(arch: Architecture, out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    text = dict(arch.clip_text)
    text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=arch.clip_vision, projection_dim=32)
    model = CLIPModel(config)
    size = arch.clip_image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                           crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def save_dino(arch: Architecture, out: Path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model = ViTModel(ViTConfig(**arch.dino), add_pooling_layer=False)
    size = arch.dino_image_size
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(out)


# Each entry: sub-directory name -> builder. The layout mirrors the real checkpoints.
_PARTS = {
    "sd": save_diffusion,
    "blip": save_blip,
    "segformer": save_segformer,
    "clip": save_clip,
    "dino": save_dino,
}


def zoo_is_complete(root: Path, arch: Architecture) -> bool:
    marker = root / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == ZOO_VERSION and meta.get("architecture") == arch.name


def build_zoo(root: Path, arch: Architecture, *, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) a random-weight zoo for ``arch`` under ``root``; returns ``root``.

    Safe to call from several processes at once: one builds, the others wait and reuse it.
    The zoo appears atomically (built in a temporary directory, then renamed).
    """
    root = Path(root)
    with file_lock(root.parent / (root.name + ".lock")):
        if not force and zoo_is_complete(root, arch):
            return root
        tmp = Path(tempfile.mkdtemp(prefix=".zoo-", dir=root.parent))
        try:
            rng_state = torch.random.get_rng_state()
            for i, (name, save) in enumerate(_PARTS.items()):
                torch.manual_seed(seed + i)
                save(arch, tmp / name)
            torch.random.set_rng_state(rng_state)
            (tmp / _MARKER).write_text(
                json.dumps({"version": ZOO_VERSION, "architecture": arch.name, "seed": seed})
            )
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root
