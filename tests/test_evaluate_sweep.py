"""evaluate, checkpoint selection and sweeps end to end on the tiny preset (32 px, 1-2 steps)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import InputError
from pipeline.quality.evaluation import (
    EvaluationConfig,
    ReferenceSet,
    evaluate_style,
    list_checkpoints,
    load_prompt_templates,
    load_references,
    promote_checkpoint,
    select_best_checkpoint,
)
from pipeline.quality.metrics import METRICS, StyleScores, load_lpips
from pipeline.quality.sweep import (
    SweepResult,
    SweepRow,
    best_per_column,
    combinations,
    format_csv,
    format_markdown,
    parse_grid,
)
from pipeline.training.style import LORA_FILE, StyleInfo, read_style

RES = 32
# Guidance 1 skips the unconditional pass: half the UNet work.
FAST = EvaluationConfig(images_per_prompt=2, num_inference_steps=1, max_prompts=1, resolution=RES,
                        thumbnail=RES, guidance_scale=1.0)


def _write_stickers(directory: Path, n: int = 3) -> Path:
    """Distinct transparent stickers: random blobs of colour on a clear background."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        rgba = np.zeros((40, 40, 4), dtype=np.uint8)
        rgba[..., :3] = rng.integers(0, 256, size=(40, 40, 3))
        rgba[4:36, 4:36, 3] = 255
        Image.fromarray(rgba, "RGBA").save(directory / f"s{i}.png")
    return directory


@pytest.fixture(scope="module")
def sources(tiny_zoo):  # -> ModelSources
    from pipeline.models import resolve_sources
    from pipeline.settings import load_settings

    return resolve_sources(load_settings(preset="tiny", tiny_zoo_dir=tiny_zoo, device="cpu",
                                         dtype="float32"))


@pytest.fixture(scope="module")
def diffusion(sources):  # -> DiffusionModels (this module's own: evaluation loads adapters)
    from pipeline.models import load_diffusion

    return load_diffusion(sources, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def encoders(sources):  # -> tuple[ImageEncoder, ImageEncoder]
    from pipeline.models import load_image_encoder

    cpu = torch.device("cpu")
    return load_image_encoder("clip", sources, device=cpu), load_image_encoder("dino", sources, device=cpu)


@pytest.fixture(scope="module")
def lora_style(tmp_path_factory, diffusion) -> Path:
    """A real LoRA style directory whose adapter visibly changes the output (non-zero B)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft import LoraConfig

    from pipeline.training.trainer import ADAPTER_NAME, TEXT_LORA_TARGETS, UNET_LORA_TARGETS, save_lora_style

    out = tmp_path_factory.mktemp("style") / "style"
    out.mkdir()
    torch.manual_seed(0)
    flags = [getattr(m, "_hf_peft_config_loaded", None) for m in (diffusion.unet, diffusion.text_encoder)]
    diffusion.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=list(UNET_LORA_TARGETS)),
                               adapter_name=ADAPTER_NAME)
    # A text-encoder LoRA too: evaluation must load and then remove both.
    diffusion.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                  target_modules=list(TEXT_LORA_TARGETS)),
                                       adapter_name=ADAPTER_NAME)
    info = StyleInfo(identifier="zqv", class_noun="cat", instance_prompt="a zqv cat sticker",
                     class_prompt="a cat sticker", base_model=diffusion.source, kind="lora",
                     resolution=RES, steps=5, seed=0, train_set_sha256="0" * 64, rank=4, lora_alpha=4,
                     text_encoder_trained=True)
    try:
        save_lora_style(out, diffusion.unet, diffusion.text_encoder, info)
    finally:
        for module, flag in zip((diffusion.unet, diffusion.text_encoder), flags, strict=True):
            recurse_remove_peft_layers(module)
            del module.peft_config
            module._hf_peft_config_loaded = flag
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory, encoders) -> ReferenceSet:
    clip, dino = encoders
    folder = _write_stickers(tmp_path_factory.mktemp("refs"))
    return ReferenceSet.from_images(load_references(folder, resolution=RES), clip=clip, dino=dino)


def _probe(diffusion) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's and the text encoder's outputs on fixed inputs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    ids = diffusion.tokenizer(["a cat sticker"], padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        return (diffusion.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample,
                diffusion.text_encoder(ids)[0])



# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_writes_json_and_contact_sheet_and_restores_the_models(
        tmp_path, diffusion, encoders, lora_style, references) -> None:
    clip, dino = encoders
    before = _probe(diffusion)
    config = dataclasses.replace(FAST, max_prompts=2)
    result = evaluate_style(diffusion, lora_style, references, clip=clip, dino=dino,
                            out_dir=tmp_path / "eval", config=config)
    # The shared models are exactly as before: the adapter was loaded under a private name and
    # deleted from the UNet and the text encoder.
    after = _probe(diffusion)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    for module in (diffusion.unet, diffusion.text_encoder):
        assert not any("lora" in n for n, _ in module.named_modules())
        assert not getattr(module, "peft_config", None) and not module._hf_peft_config_loaded

    report = json.loads(result.json_path.read_text())
    assert set(report["scores"]) >= {"clip_i", "dino", "clip_t", "diversity", "diversity_note"}
    for metric in ("clip_i", "dino", "clip_t"):
        assert -1.0 <= report["scores"][metric] <= 1.0
    assert report["scores"]["num_generated"] == 4 and report["scores"]["num_references"] == 3
    if not load_lpips().available:
        assert report["scores"]["diversity"] is None
        assert report["scores"]["diversity_note"].startswith("LPIPS unavailable")
    prompts = [row["prompt"] for row in report["per_prompt"]]
    assert prompts == ["a zqv cat on the beach", "a zqv cat in the snow"]
    # CLIP-T saw the prompts with the identifier gone.
    assert [row["neutral_prompt"] for row in report["per_prompt"]] == ["a cat on the beach",
                                                                        "a cat in the snow"]
    assert report["per_prompt"][0]["family"] == "recontextualisation"

    sheet = Image.open(result.sheet_path)
    # references row + 2 prompt rows; 3 columns (3 references, 2 samples per prompt).
    assert sheet.size == (220 + 3 * (RES + 4) + 4, 3 * (RES + 4) + 4)
    assert sorted(p.name for p in (tmp_path / "eval" / "images").iterdir()) == [
        "p00_0.png", "p00_1.png", "p01_0.png", "p01_1.png"]


def test_evaluation_is_seeded_and_the_adapter_changes_the_images(
        tmp_path, diffusion, encoders, lora_style, references) -> None:
    clip, dino = encoders
    first = evaluate_style(diffusion, lora_style, references, clip=clip, dino=dino,
                           out_dir=tmp_path / "a", config=FAST)
    again = evaluate_style(diffusion, lora_style, references, clip=clip, dino=dino,
                           out_dir=tmp_path / "b", config=FAST)
    assert first.scores == again.scores
    assert np.array_equal(np.asarray(first.images[0][0]), np.asarray(again.images[0][0]))
    # The two samples of one prompt come from different seeds.
    assert not np.array_equal(np.asarray(first.images[0][0]), np.asarray(first.images[0][1]))
    off = evaluate_style(diffusion, lora_style, references, clip=clip, dino=dino,
                         out_dir=tmp_path / "c", config=dataclasses.replace(FAST, lora_scale=0.0))
    assert not np.array_equal(np.asarray(first.images[0][0]), np.asarray(off.images[0][0]))


def test_prompt_file_is_checked_line_by_line(tmp_path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# sticker prompts\n\na {identifier} {class_noun} eating pizza\n"
                    "{identifier} style, a dog\n")
    assert load_prompt_templates(good) == ["a {identifier} {class_noun} eating pizza",
                                           "{identifier} style, a dog"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a {identifier} cat\na {class_noun} without the identifier\n")
    with pytest.raises(InputError, match=r"bad.txt, line 2: .*\{identifier\}"):
        load_prompt_templates(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(InputError, match="no prompts"):
        load_prompt_templates(empty)


# --- checkpoints --------------------------------------------------------------------------------


def test_best_checkpoint_is_chosen_among_intermediate_adapters_and_promoted(
        tmp_path, diffusion, encoders, references) -> None:
    from pipeline.training.sticker_set import list_sticker_files, prepare_sticker_set
    from pipeline.training.trainer import TrainingConfig, train_style

    clip, dino = encoders
    prepared = prepare_sticker_set(list_sticker_files(_write_stickers(tmp_path / "set")), resolution=RES)
    config = TrainingConfig(steps=2, save_intermediate_every=1, with_prior_preservation=False,
                            class_noun="cat", lr=1e-2)
    trained = train_style(diffusion, prepared, config, out_dir=tmp_path / "style",
                          work_dir=tmp_path / "work", class_cache_dir=tmp_path / "cls")
    style_dir = trained.style_dir
    assert [step for step, _ in list_checkpoints(style_dir)] == [1, 2]

    selection = select_best_checkpoint(diffusion, style_dir, references, clip=clip, dino=dino,
                                       out_dir=tmp_path / "ckpt", metric="dino", config=FAST)
    assert [c.step for c in selection.candidates] == [1, 2]
    values = [c.scores.dino for c in selection.candidates]
    assert selection.best.scores.dino == max(values)
    saved = json.loads(selection.json_path.read_text())
    assert saved["best_step"] == selection.best.step and len(saved["candidates"]) == 2

    # Promote the first checkpoint (whichever won): the final weights are kept as step-2.
    first = selection.candidates[0]
    forced = dataclasses.replace(selection, best=first)
    final_bytes = (style_dir / LORA_FILE).read_bytes()
    info = promote_checkpoint(style_dir, forced)
    assert (style_dir / LORA_FILE).read_bytes() == (first.weights_dir / LORA_FILE).read_bytes()
    assert (style_dir / "intermediate" / "step-2" / LORA_FILE).read_bytes() == final_bytes
    assert read_style(style_dir).extra["selected_checkpoint"]["step"] == 1
    assert info.extra["selected_checkpoint"]["metric"] == "dino"
    assert [(step, path.name) for step, path in list_checkpoints(style_dir)] == [(1, "style"),
                                                                             (2, "step-2")]
    # And back: promoting step 2 restores the final weights.
    back = select_best_checkpoint(diffusion, style_dir, references, clip=clip, dino=dino,
                                  out_dir=tmp_path / "ckpt2", metric="dino", config=FAST)
    promote_checkpoint(style_dir, dataclasses.replace(back, best=back.candidates[1]))
    assert (style_dir / LORA_FILE).read_bytes() == final_bytes
    with pytest.raises(ValueError, match="unknown metric"):
        select_best_checkpoint(diffusion, style_dir, references, clip=clip, dino=dino,
                               out_dir=tmp_path / "x", metric="fid", config=FAST)


# --- sweep: grid and table ----------------------------------------------------------------------


def test_parse_grid_types_values_by_the_training_config() -> None:
    grid = parse_grid(["lr=1e-4,1e-5", "rank=4,16,64", "text_encoder=0,1 prior=0,true"])
    assert grid == {"lr": [1e-4, 1e-5], "rank": [4, 16, 64], "text_encoder": [False, True],
                    "prior": [False, True]}
    assert isinstance(grid["rank"][0], int)
    assert len(combinations(grid)) == 2 * 3 * 2 * 2
    assert combinations({"a": [1, 2], "b": [3, 4]}) == [
        {"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3}, {"a": 2, "b": 4}]
    assert parse_grid(["steps=10,none"]) == {"steps": [10, None]}
    for bad, why in [(["foo=1,2"], "unknown grid key 'foo'"), (["rank=4,x"], "not an integer"),
                     (["prior=2"], "not 0 or 1"), (["rank"], "KEY=V1,V2"), (["rank=4,4"], "repeated"),
                     (["rank=4", "rank=8"], "twice"), ([], "empty")]:
        with pytest.raises(InputError, match=why):
            parse_grid(bad)


def _scores(ci: float, d: float, ct: float, div: float | None = None) -> StyleScores:
    return StyleScores(clip_i=ci, dino=d, clip_t=ct, diversity=div,
                       diversity_note=None if div is not None else "LPIPS unavailable: test")


def test_table_has_a_row_per_setting_and_marks_the_best_per_column() -> None:
    rows = [
        SweepRow(params={"lr": 1e-4, "rank": 4}, scores=_scores(0.80, 0.70, 0.30),
                 style_dir=Path("a"), train_seconds=1.0, eval_seconds=1.0, loss=0.1),
        SweepRow(params={"lr": 1e-4, "rank": 16}, scores=_scores(0.87, 0.60, 0.30),
                 style_dir=Path("b"), train_seconds=2.0, eval_seconds=1.0, loss=0.2),
        SweepRow(params={"lr": 1e-5, "rank": 4}, scores=_scores(0.75, 0.81, 0.25),
                 style_dir=Path("c"), train_seconds=3.0, eval_seconds=1.0, loss=None, reused=True),
    ]
    result = SweepResult(keys=["lr", "rank"], rows=rows, notes=["LPIPS unavailable: test"])
    assert best_per_column([r.scores for r in rows]) == {
        "clip_i": {1}, "dino": {2}, "clip_t": {0, 1}, "diversity": set()}

    md = format_markdown(result).splitlines()
    assert md[0] == "| lr | rank | CLIP-I | DINO | CLIP-T | LPIPS div. | train s |"
    assert md[2] == "| 0.0001 | 4 | 0.8000 | 0.7000 | **0.3000** | n/a | 1.0 |"
    assert md[3] == "| 0.0001 | 16 | **0.8700** | 0.6000 | **0.3000** | n/a | 2.0 |"
    assert md[4] == "| 1e-05 | 4 | 0.7500 | **0.8100** | 0.2500 | n/a | 3.0 (reused) |"
    assert "Note: LPIPS unavailable: test" in md

    table = list(csv.DictReader(io.StringIO(format_csv(result))))
    assert list(table[0]) == ["lr", "rank", *METRICS, "train_seconds", "eval_seconds", "loss", "best",
                              "style_dir"]
    assert [r["best"] for r in table] == ["clip_t", "clip_i;clip_t", "dino"]
    assert [r["rank"] for r in table] == ["4", "16", "4"]
    assert table[2]["loss"] == "" and table[0]["diversity"] == ""


# --- the commands end to end --------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch, tiny_settings):
    monkeypatch.setenv("STICKERBOT_PRESET", "tiny")
    monkeypatch.setenv("STICKERBOT_DATA_DIR", str(tiny_settings.data_dir))
    monkeypatch.setenv("STICKERBOT_TINY_ZOO_DIR", str(tiny_settings.zoo_dir))
    monkeypatch.setenv("STICKERBOT_DEVICE", "cpu")
    monkeypatch.setenv("STICKERBOT_DTYPE", "float32")
    return tiny_settings


def test_sweep_command_trains_and_evaluates_a_2x2_grid(tmp_path, cli_env, capsys) -> None:
    from pipeline.cli import main

    stickers = _write_stickers(tmp_path / "stickers")
    out = tmp_path / "sweep"
    argv = ["sweep", "--stickers", str(stickers), "--grid", "text_encoder=0,1", "prior=0,1", "--steps", "1",
            "--num-class-images", "1", "--class-image-steps", "1", "--resolution", str(RES),
            "--max-prompts", "1", "--images-per-prompt", "2", "--eval-steps", "1", "--guidance", "1",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| text_encoder | prior | CLIP-I | DINO | CLIP-T | LPIPS div. | train s |" in printed

    table = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [(r["text_encoder"], r["prior"]) for r in table] == [("0", "0"), ("0", "1"), ("1", "0"),
                                                                 ("1", "1")]
    for n, row in enumerate(table):
        info = read_style(out / f"run-{n:02d}" / "style")
        assert info.text_encoder_trained is (row["text_encoder"] == "1")
        assert info.extra["config"]["with_prior_preservation"] is (row["prior"] == "1")
        assert (out / f"run-{n:02d}" / "eval" / "metrics.json").is_file()
    # Each metric's best row is marked, and it holds that column's maximum.
    for metric in ("clip_i", "dino", "clip_t"):
        values = [float(r[metric]) for r in table]
        marked = [i for i, r in enumerate(table) if metric in r["best"].split(";")]
        assert marked and all(values[i] == max(values) for i in marked)
    md = (out / "sweep.md").read_text().splitlines()
    assert len([line for line in md if line.startswith(("| 0 |", "| 1 |"))]) == 4
    assert md[0].count("|") == 8
    # One class-image cache entry, shared by both prior runs.
    assert len([p for p in (cli_env.data_dir / "class-images").iterdir() if p.is_dir()]) == 1

    # Rerunning into the same directory reuses every trained style and its scores.
    before = (out / "sweep.csv").read_text()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("reusing the trained style") == 4 and again.count("scores reused") == 4
    strip = [line.rsplit(",", 6)[0] for line in before.splitlines()]
    assert [line.rsplit(",", 6)[0] for line in (out / "sweep.csv").read_text().splitlines()] == strip


def test_evaluate_command_writes_its_files_and_refuses_bad_input(
        tmp_path, cli_env, lora_style, capsys) -> None:
    from pipeline.cli import main

    refs = _write_stickers(tmp_path / "refs")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {identifier} {class_noun} sticker, waving\n")
    out = tmp_path / "out"
    assert main(["evaluate", "--style", str(lora_style), "--references", str(refs), "--prompts",
                 str(prompts), "--out", str(out), "--images-per-prompt", "2", "--steps", "1",
                 "--resolution", str(RES), "--guidance", "1"]) == 0
    printed = capsys.readouterr().out
    assert "CLIP-I" in printed and "published" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert [r["prompt"] for r in report["per_prompt"]] == ["a zqv cat sticker, waving"]
    assert (out / "contact_sheet.png").is_file()

    assert main(["evaluate", "--style", str(tmp_path / "nope"), "--references", str(refs)]) == 2
    assert "no style.json" in capsys.readouterr().err
    assert main(["evaluate", "--style", str(lora_style)]) == 2
    assert "--references" in capsys.readouterr().err

    templates = tmp_path / "templates.txt"
    templates.write_text("a telegram sticker\na photo of a {class_noun}\n")
    assert main(["evaluate", "--rank-prompts", str(templates), "--good", str(refs), "--bad", str(refs),
                 "--class-noun", "cat"]) == 0
    ranking = capsys.readouterr().out
    assert "a telegram sticker" in ranking and "a photo of a cat" in ranking and "margin" in ranking
