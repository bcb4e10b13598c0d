"""A Hugging Face hub cache of tiny random-weight models under the real ids of the ``sd15`` preset.

``build_hub_cache(root)`` writes, offline and in seconds, ``root/hub`` in the layout
``huggingface_hub`` reads with ``HF_HUB_OFFLINE=1`` (``file_download.py``: a repo lives in
``models--{org}--{name}/``; ``refs/main`` holds a commit id with no newline; the files are
``snapshots/<commit>/<path>``, here relative symlinks into ``blobs/<sha256>`` as the hub client
writes them). Point ``HF_HUB_CACHE`` at it (subprocesses) or pass it as ``cache_dir`` /
``STICKERBOT_MODEL_CACHE_DIR`` (in-process), and ``--preset sd15`` runs the operator's real
loading path with no network: the real ids, file names, variants, config classes and metadata,
with the models' sizes shrunk (the ``tiny`` preset's configs; vision models keep their real input
sizes so that the real preprocessor configs fit them).

Tests use the session fixture ``hub_cache`` (tests/conftest.py). Benchmarks and people call
``build_hub_cache(dir)`` or ``python -m tests.hub_mirror DIR``, then e.g.
``HF_HUB_CACHE=DIR/hub HF_HUB_OFFLINE=1 stickerbot doctor``.

What each repository mirrors, and what it leaves out
----------------------------------------------------
``stable-diffusion-v1-5/stable-diffusion-v1-5`` (diffusers multi-folder layout)
    Mirrors: ``model_index.json`` with the real component classes (``PNDMScheduler``,
    ``CLIPTextModel``, ``CLIPTokenizer``, ``UNet2DConditionModel``, ``AutoencoderKL``,
    ``StableDiffusionSafetyChecker`` from ``stable_diffusion``, ``CLIPImageProcessor``);
    ``unet/ vae/ text_encoder/ safety_checker/`` each with ``config.json``, fp32
    ``*.safetensors`` and the ``*.fp16.safetensors`` variant; ``scheduler/scheduler_config.json``
    as shipped (PNDM, scaled_linear 0.00085-0.012, 1000 steps, steps_offset 1, skip_prk_steps);
    ``tokenizer/`` as the slow-tokenizer files the repo has (``vocab.json``, ``merges.txt``,
    ``special_tokens_map.json``, ``tokenizer_config.json`` with ``AddedToken`` dicts,
    ``model_max_length`` 77, bos ``<|startoftext|>``, eos/pad/unk ``<|endoftext|>``) and no
    ``tokenizer.json``; ``feature_extractor/preprocessor_config.json`` as shipped (the legacy
    ``CLIPFeatureExtractor`` type name, int ``size``/``crop_size`` 224, CLIP mean/std).
    Leaves out: the ``.bin`` / ``.non_ema.bin`` weights beside the safetensors (the loaders
    prefer safetensors), the single-file checkpoints at the root (``v1-5-pruned*.ckpt`` /
    ``.safetensors``), README and images. Sizes: the tiny configs (UNet 32/64 channels, a
    four-level VAE 8/16/32/32 wide with SD's 8x downsampling, text encoder 32 wide); the
    safety checker is a tiny CLIP vision tower at the real 224-px input whose concept
    thresholds never flag (``build_safety_checker(flags=False)``; the real one flags what
    resembles its 17 concepts).
``Salesforce/blip-image-captioning-base``
    Mirrors: ``config.json`` (``BlipForConditionalGeneration``), ``model.safetensors``,
    ``preprocessor_config.json`` (``BlipImageProcessor``, 384 px, CLIP mean/std),
    ``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json`` (``BertTokenizer``),
    ``special_tokens_map.json``. Leaves out: ``pytorch_model.bin``, ``tf_model.h5``. The
    vocabulary is the zoo's small word list (the real one is bert-base-uncased's 30,524).
``nvidia/mit-b0``: as it really is, an ImageNet-1k classification checkpoint
    Mirrors: ``config.json`` with ``architectures: ["SegformerForImageClassification"]`` and the
    1000 ImageNet labels in ``id2label`` (label 0 "tench"; no background class), the real
    encoder fields (patch sizes, strides, sr ratios, mlp ratios); ``pytorch_model.bin`` holding
    the encoder and the 1000-way classifier and **no** ``decode_head.*`` weights;
    ``preprocessor_config.json`` in the legacy ``SegformerFeatureExtractor`` form (int
    ``size`` 512, ``reduce_labels``). Leaves out: ``tf_model.h5``. The label names are the short
    ImageNet names (pytorch/hub ``imagenet_classes.txt``); the real config carries the WordNet
    synonyms ("tench, Tinca tinca").
``openai/clip-vit-base-patch32``
    Mirrors: ``config.json`` (``CLIPModel``), ``model.safetensors``, ``preprocessor_config.json``
    (legacy ``CLIPFeatureExtractor``, 224 px), ``vocab.json``, ``merges.txt``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``. Leaves out: ``pytorch_model.bin``,
    ``tf_model.h5``, ``flax_model.msgpack``. Vision tower at the real 224 px / patch 32.
``facebook/dino-vits16``
    Mirrors: ``config.json`` (``ViTModel``), weights, ``preprocessor_config.json`` (legacy
    ``ViTFeatureExtractor``, 224 px, ImageNet mean/std). Patch 16 at 224 px as the real one.
    Leaves out: ``tf_model.h5``.
``latent-consistency/lcm-lora-sdv1-5``
    Mirrors: ``pytorch_lora_weights.safetensors`` in the real (kohya) key naming:
    ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, which
    diffusers converts when loading. Covers the tiny UNet's attention projections and the
    transformer blocks' ``proj_in``/``proj_out`` (the real one also covers feed-forward and
    ResNet layers: 67.5 M parameters). Leaves out: README.

Sources. Checked against copies found with the search tool: the SD 1.5 component folders and
file names, the scheduler fields and the feature-extractor config (public repos quoting the
repository's files; FACTS.md), ``model_index.json``'s classes (FACTS.md and the issue), mit-b0 as a
1000-class ImageNet ``SegformerForImageClassification`` (transformers' own SegFormer example), the
LCM-LoRA's 67.5 M parameters (its model card). Written from the author's knowledge of the
repositories and not checked against a copy here: the remaining mit-b0 config fields (b0's
published encoder settings), the BLIP, CLIP and DINO preprocessor files, the SD tokenizer_config
and the LCM-LoRA's kohya key naming. No test asserts a field of those beyond what is named above.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MIRROR_VERSION = 1
_MARKER = "hub-mirror.json"
DATA = Path(__file__).parent / "data"

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BLIP = "Salesforce/blip-image-captioning-base"
SEGFORMER = "nvidia/mit-b0"
CLIP = "openai/clip-vit-base-patch32"
DINO = "facebook/dino-vits16"
LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
REPOS = (SD15, BLIP, SEGFORMER, CLIP, DINO, LCM_LORA)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def mirror_architecture():  # -> Architecture
    """The tiny configs, with each vision model at its real input size and patch size, and a
    VAE with SD's four levels (8x downsampling): the tiny two-level VAE would run its mid-block
    attention over (512/2)^2 tokens at the real 512-px resolution (a minute per image on a CPU)."""
    from pipeline.architectures import TINY

    attn = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
    return dataclasses.replace(
        TINY, name="hub-mirror",
        blip_vision={**attn, "image_size": 384, "patch_size": 16}, blip_image_size=384,
        clip_vision={**attn, "image_size": 224, "patch_size": 32}, clip_image_size=224,
        dino={**attn, "image_size": 224, "patch_size": 16, "qkv_bias": True}, dino_image_size=224,
        segmenter_size=512,
        vae={**TINY.vae, "block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8,
             "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
             "sample_size": 512},
    )


def commit_of(repo_id: str) -> str:
    """A made-up, stable 40-hex commit id per repo (the real ones are the hub's)."""
    return hashlib.sha1(f"{repo_id}@mirror-{MIRROR_VERSION}".encode()).hexdigest()


def repo_dir(hub: Path, repo_id: str) -> Path:
    return Path(hub) / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(hub: Path, repo_id: str) -> Path:
    return repo_dir(hub, repo_id) / "snapshots" / commit_of(repo_id)


def _json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _write_clip_tokenizer_files(out: Path, *, sd_style: bool) -> None:
    """vocab.json + merges.txt (the slow-tokenizer files) and the special-token metadata."""
    from pipeline.zoo import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = _added_token("<|startoftext|>"), _added_token("<|endoftext|>")
    _json(out / "special_tokens_map.json",
          {"bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": eos})
    config: dict[str, Any] = {
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    }
    if sd_style:  # the SD 1.5 repo's file, written by an old transformers
        config.update({key: {"__type": "AddedToken", **tok} for key, tok in
                       (("bos_token", bos), ("eos_token", eos), ("unk_token", eos))})
        config.update(name_or_path="openai/clip-vit-large-patch14",
                      special_tokens_map_file="./special_tokens_map.json")
    else:
        config.update(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                      name_or_path="openai/clip-vit-base-patch32")
    _json(out / "tokenizer_config.json", config)


SD_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD_FEATURE_EXTRACTOR = {
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD, "resample": 3, "size": 224,
}
SAFETY_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                 "num_hidden_layers": 2, "image_size": 224, "patch_size": 32}


def stage_sd15(out: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor

    from pipeline.zoo import build_diffusion_pipeline, build_safety_checker

    checker = build_safety_checker(SAFETY_VISION, flags=False)
    pipe: Any = build_diffusion_pipeline(mirror_architecture(), safety_checker=checker,
                                         feature_extractor=CLIPImageProcessor())
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True, variant="fp16")
    _json(out / "model_index.json", SD_MODEL_INDEX)
    _json(out / "scheduler" / "scheduler_config.json", SD_SCHEDULER_CONFIG)
    _json(out / "feature_extractor" / "preprocessor_config.json", SD_FEATURE_EXTRACTOR)
    shutil.rmtree(out / "tokenizer")
    _write_clip_tokenizer_files(out / "tokenizer", sd_style=True)


def _drop_new_style_files(out: Path) -> None:
    """transformers 5 writes processor_config.json and generation_config.json; the 2022 repos
    hold neither (their processor settings live in preprocessor/tokenizer configs)."""
    for name in ("processor_config.json", "generation_config.json"):
        (out / name).unlink(missing_ok=True)


def stage_blip(out: Path) -> None:
    from pipeline.zoo import save_blip

    save_blip(mirror_architecture(), out)
    _drop_new_style_files(out)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    _json(out / "special_tokens_map.json", {
        "bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
        "sep_token": "[SEP]", "unk_token": "[UNK]"})
    _json(out / "preprocessor_config.json", {
        "do_normalize": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor", "size": 384})


def imagenet_labels() -> list[str]:
    labels = (DATA / "imagenet_classes.txt").read_text().splitlines()
    assert len(labels) == 1000, len(labels)
    return labels


MIT_B0_FIELDS = {
    "architectures": ["SegformerForImageClassification"],
    "attention_probs_dropout_prob": 0.0, "classifier_dropout_prob": 0.1,
    "downsampling_rates": [1, 4, 8, 16], "drop_path_rate": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "image_size": 224, "initializer_range": 0.02, "layer_norm_eps": 1e-06,
    "mlp_ratios": [4, 4, 4, 4], "model_type": "segformer", "num_channels": 3, "num_encoder_blocks": 4,
    "patch_sizes": [7, 3, 3, 3], "reshape_last_stage": True, "semantic_loss_ignore_index": 255,
    "sr_ratios": [8, 4, 2, 1], "strides": [4, 2, 2, 2],
}


def stage_mit_b0(out: Path) -> None:
    import torch
    from transformers import SegformerConfig, SegformerForImageClassification

    labels = imagenet_labels()
    id2label = {str(i): name for i, name in enumerate(labels)}
    fields = {**MIT_B0_FIELDS, **mirror_architecture().segformer}
    config_dict = {**fields, "id2label": id2label, "label2id": {n: int(i) for i, n in id2label.items()}}
    model = SegformerForImageClassification(SegformerConfig(**{
        k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")}))
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    assert not any(k.startswith("decode_head.") for k in state)
    torch.save(state, out / "pytorch_model.bin")
    _json(out / "config.json", {**config_dict, "torch_dtype": "float32",
                                "transformers_version": "4.12.0.dev0"})
    _json(out / "preprocessor_config.json", {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "SegformerFeatureExtractor",
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "reduce_labels": False, "resample": 2,
        "size": 512})


def stage_clip(out: Path) -> None:
    from pipeline.zoo import save_clip

    save_clip(mirror_architecture(), out)
    _drop_new_style_files(out)
    _write_clip_tokenizer_files(out, sd_style=False)
    _json(out / "preprocessor_config.json", {
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": 224})


def stage_dino(out: Path) -> None:
    from pipeline.zoo import save_dino

    save_dino(mirror_architecture(), out)
    _json(out / "preprocessor_config.json", {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 2, "size": 224})


def lcm_lora_state(unet: Any, *, rank: int = 4, seed: int = 0) -> dict[str, Any]:
    """A kohya-named LoRA (``lora_unet_...lora_down/lora_up/alpha``) for ``unet``'s attention
    projections and transformer ``proj_in``/``proj_out``, with small non-zero weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
    state: dict[str, Any] = {}
    for name, module in unet.named_modules():
        if not name.endswith(targets) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=gen) * 0.01
            up = torch.randn(module.out_features, rank, generator=gen) * 0.01
        else:
            down = torch.randn(rank, module.in_channels, 1, 1, generator=gen) * 0.01
            up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * 0.01
        state[f"{key}.lora_down.weight"] = down.half()
        state[f"{key}.lora_up.weight"] = up.half()
        state[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    return state


def stage_lcm_lora(out: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel(**mirror_architecture().unet)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lcm_lora_state(unet), str(out / "pytorch_lora_weights.safetensors"))


STAGERS = {SD15: stage_sd15, BLIP: stage_blip, SEGFORMER: stage_mit_b0, CLIP: stage_clip, DINO: stage_dino,
           LCM_LORA: stage_lcm_lora}


def install_repo(hub: Path, repo_id: str, staged: Path) -> Path:
    """Move ``staged``'s files into ``hub`` as the hub client stores a download: content in
    ``blobs/<sha256>``, ``snapshots/<commit>/<path>`` a relative symlink to it, ``refs/main``."""
    repo = repo_dir(hub, repo_id)
    commit = commit_of(repo_id)
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = path.relative_to(staged)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline: huggingface_hub reads it verbatim
    return snap


def hub_is_complete(root: Path) -> bool:
    try:
        meta = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == MIRROR_VERSION and sorted(meta.get("repos", [])) == sorted(REPOS)


def build_hub_cache(root: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the mirror under ``root``; returns the hub cache dir (``root/hub``, what
    ``HF_HUB_CACHE`` names). Safe across processes: one builds, others wait and reuse it."""
    import torch

    from pipeline.storage.files import file_lock

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".hub-mirror.lock"):
        if not force and hub_is_complete(root):
            return root / "hub"
        tmp = Path(tempfile.mkdtemp(prefix=".hub-", dir=root))
        rng_state = torch.random.get_rng_state()
        try:
            for i, (repo_id, stage) in enumerate(STAGERS.items()):
                torch.manual_seed(seed + i)
                staged = tmp / "stage" / repo_id.replace("/", "--")
                stage(staged)
                install_repo(tmp / "hub", repo_id, staged)
            shutil.rmtree(tmp / "stage")
            if (root / "hub").exists():
                shutil.rmtree(root / "hub")
            os.replace(tmp / "hub", root / "hub")
            (root / _MARKER).write_text(json.dumps({"version": MIRROR_VERSION, "repos": list(REPOS),
                                                    "seed": seed}))
        finally:
            torch.random.set_rng_state(rng_state)
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "hub"


def copy_hub(hub: Path, dest: Path) -> Path:
    """A private copy of a built cache (symlinks kept) that a test may damage."""
    shutil.copytree(hub, dest, symlinks=True)
    return dest


def blob_of(hub: Path, repo_id: str, rel: str) -> Path:
    """The blob a snapshot file points at (what a test truncates)."""
    return (snapshot_dir(hub, repo_id) / rel).resolve()


def hub_env(hub: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that runs the sd15 preset against ``hub``, offline, on the CPU."""
    env = dict(os.environ)
    env.update(HF_HUB_CACHE=str(hub), HF_HOME=str(Path(hub).parent / "hf-home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", STICKERBOT_PRESET="sd15", STICKERBOT_DEVICE="cpu")
    env.update(extra)
    return env


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.hub_mirror DIR  (writes DIR/hub; set HF_HUB_CACHE to it)")
    print(build_hub_cache(sys.argv[1]))
