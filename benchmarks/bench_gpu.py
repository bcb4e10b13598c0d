"""Every GPU figure of the product in one offline command (benchmarks/README.md says how to run it).

    python -m benchmarks gpu [--quick] [--out DIR]

SD 1.5-sized random-weight models (``pipeline.architectures.SD15``: the real UNet, VAE, CLIP-L
text encoder, BLIP-base and SegFormer-b0 sizes) are written once as a model directory
(``pipeline.zoo``, reused from ``--zoo-dir`` on a rerun) and loaded through the product's own
loading code, so no weights and no network are needed. Random weights cost what real ones cost,
with two exceptions said beside their figures: BLIP's random text decoder never stops early,
so captions run to the length limit (a worst case), and the LCM-LoRA is a rank-64 stand-in on
the attention projections (the real one covers more layers).

Sections, each written to JSON and Markdown as soon as it is measured (a run cut short keeps what
it had): sticker latency per stage (eager, compiled, fast mode), the 8-style round-robin
(hot-swap into the compiled UNet vs loading from disk), class-image generation, training steps/s
and peak VRAM (default, low-memory and full fine-tuning, with and without prior preservation),
segmenter latency at batch 1 and 8, BLIP latency, and segmenter training steps/s.

On a machine without a CUDA GPU it says so in one line and exits with status 3 (``python -m
benchmarks``, the CPU run of every benchmark, leaves this one out). ``--device cpu --tiny``
runs every section on the tiny models in seconds, for the test that keeps this script working.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NO_GPU_EXIT = 3
RESULTS_DIR = Path(__file__).parent / "results"
JSON_NAME, MARKDOWN_NAME = "gpu.json", "gpu.md"
ROUND_ROBIN_STYLES = 8
STYLE_RANK = 16
LCM_STANDIN_RANK = 64


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 3-minute subset")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"where {JSON_NAME} and "
                        f"{MARKDOWN_NAME} go (default: benchmarks/results)")
    parser.add_argument("--zoo-dir", type=Path, default=None,
                        help="random-weight model directory, built there once and reused")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    # For the test that runs this script on a CPU: tiny models, dynamo's eager backend.
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- measuring ----------------------------------------------------------------------------------


def summary(seconds: list[float]) -> dict[str, Any]:
    """p50 and p95 in milliseconds (nearest-rank over the runs, stated with their count)."""
    import numpy as np

    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "runs": len(seconds)}


class Bench:
    """Runs the sections, keeps the results and rewrites JSON + Markdown after each one."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        import torch

        self.args, self.root = args, root
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.reps = 2 if args.tiny else (5 if args.quick else 10)
        card = torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu"
        self.results: dict[str, Any] = {
            "card": card, "device": args.device, "quick": args.quick, "tiny": args.tiny,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sections": {},
        }

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any], runs: int) -> list[float]:
        out = []
        for _ in range(runs):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - start)
        return out

    def peak_reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 2)

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        wanted = [s for s in self.args.only.split(",") if s]
        if wanted and name not in wanted:
            return
        print(f"--- {name}", flush=True)
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # one broken section must not lose the others' figures
            result = {"error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.results["sections"][name] = result
        print(json.dumps(result, indent=1), flush=True)
        self.write()

    def write(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / JSON_NAME).write_text(json.dumps(self.results, indent=1) + "\n")
        (out / MARKDOWN_NAME).write_text(markdown(self.results))


def markdown(results: dict[str, Any]) -> str:
    """One table row per figure, named by section and key."""
    lines = [f"# GPU benchmark: {results['card']}", "",
             f"`python -m benchmarks gpu{' --quick' if results['quick'] else ''}`, started "
             f"{results['started']}; torch {results['torch']}, CUDA {results['cuda']}"
             f"{'; TINY MODELS (a test run, not a measurement)' if results['tiny'] else ''}.", "",
             "| section | figure | value |", "|---|---|---|"]

    def rows(section: str, prefix: str, value: Any) -> None:
        if isinstance(value, dict) and "p50_ms" in value:
            lines.append(f"| {section} | {prefix} | p50 {value['p50_ms']} ms, p95 {value['p95_ms']} ms "
                         f"({value['runs']} runs) |")
        elif isinstance(value, dict):
            for key, sub in value.items():
                rows(section, f"{prefix} / {key}" if prefix else key, sub)
        else:
            lines.append(f"| {section} | {prefix} | {value} |")

    for name, section in results["sections"].items():
        rows(name, "", section)
    return "\n".join(lines) + "\n"


# --- the models ---------------------------------------------------------------------------------


def load(bench: Bench) -> Any:  # -> Models
    from pipeline.architectures import SD15, TINY
    from pipeline.models import load_models
    from pipeline.settings import load_settings
    from pipeline.zoo import build_zoo

    args = bench.args
    arch = TINY if args.tiny else SD15
    zoo_dir = args.zoo_dir or Path(tempfile.gettempdir()) / f"stickerbot-bench-zoo-{arch.name}"
    start = time.perf_counter()
    zoo = build_zoo(zoo_dir, arch)
    built = time.perf_counter() - start
    dtype = "float16" if bench.cuda else "float32"
    settings = load_settings(preset="sd15", data_dir=bench.root / "data", device=args.device, dtype=dtype,
                             diffusion_model=str(zoo / "sd"), captioner_model=str(zoo / "blip"),
                             segmenter_model=str(zoo / "segformer"), clip_model=str(zoo / "clip"),
                             dino_model=str(zoo / "dino"), safety_checker=False)
    models = load_models(settings)
    models.diffusion.resolution = arch.resolution
    bench.results["models"] = {"architecture": arch.name, "zoo_build_s": round(built, 1),
                               "load_s": round(time.perf_counter() - start - built, 1), "zoo": str(zoo),
                               # The random zoo ships no NSFW checker; the real one adds one CLIP
                               # ViT-L/14 image pass per sticker, not counted here.
                               "safety_checker": "off"}
    return models


def photo_bytes(size: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_styles(bench: Bench, models: Any) -> tuple[list[Any], Path]:
    """``ROUND_ROBIN_STYLES`` random rank-16 styles and the LCM-LoRA stand-in."""
    from pipeline.stickers.generation import StyleRef, write_random_style

    styles = []
    for i in range(ROUND_ROBIN_STYLES):
        write_random_style(models.diffusion, bench.root / "styles" / f"s{i}", seed=i, rank=STYLE_RANK)
        styles.append(StyleRef.open(bench.root / "styles" / f"s{i}"))
    lcm = bench.root / "lcm"
    write_random_style(models.diffusion, lcm, seed=99, rank=LCM_STANDIN_RANK)
    return styles, lcm


# --- sections -----------------------------------------------------------------------------------


def sticker_latency(bench: Bench, sticker_models: Any, style: Any, *, fast: bool) -> dict[str, Any]:
    """Per-stage p50/p95 of whole stickers (first call reported apart: compile or warm-up)."""
    from pipeline.stickers.sticker_pipeline import STAGES, StickerOptions, make_sticker

    size = sticker_models.models.diffusion.resolution
    photo = photo_bytes(size)
    # The product's defaults (30 steps x strength 0.6, guidance 7); the tiny test run uses 2 steps.
    kw: dict[str, Any] = {"steps": 4, "strength": 0.5} if bench.args.tiny else {}
    timings: list[dict[str, float]] = []
    first = time.perf_counter()
    make_sticker(sticker_models, style, photo, StickerOptions(seed=0, fast=fast, **kw))
    first_s = time.perf_counter() - first
    for i in range(bench.reps):
        timings.append(make_sticker(sticker_models, style, photo,
                                    StickerOptions(seed=i + 1, fast=fast, **kw)).timings)
    out: dict[str, Any] = {"first_call_s": round(first_s, 2)}
    for stage in (*STAGES, "total"):
        out[stage] = summary([t[stage] for t in timings])
    return out


def round_robin(bench: Bench, generator: Any, styles: list[Any], *, rounds: int,
                generate: bool = False) -> dict[str, Any]:
    """Making each of 8 styles ready in turn (``prepare``); with ``generate``, one short
    generation after each, so a recompilation would show in dynamo's counters. The first round
    is not timed."""
    from PIL import Image
    from torch._dynamo.utils import counters

    from pipeline.stickers.generation import GenerationParams

    params = GenerationParams()
    short = GenerationParams(steps=4, strength=0.5)
    size = generator.diffusion.resolution
    image = Image.new("RGB", (size, size), "white")
    times: list[float] = []
    graphs_before: int | None = None
    for r in range(rounds + 1):
        for style in styles:
            bench.sync()
            start = time.perf_counter()
            generator.prepare(style, params)
            bench.sync()
            if r:
                times.append(time.perf_counter() - start)
            if generate:
                generator.generate(image, prompt="a zqv cat sticker", negative_prompt=None, seeds=[0],
                                   style=style, params=short)
        if r == 0:
            graphs_before = int(counters["stats"]["unique_graphs"])
    graphs = int(counters["stats"]["unique_graphs"]) - (graphs_before or 0)
    return {"switch": summary(times), "graphs_compiled_after_first_round": graphs,
            "disk_loads": generator.loads}


def eager_serving(bench: Bench, models: Any, styles: list[Any], lcm: Path) -> None:
    """Stickers and style switching on the ordinary path: adapters side by side, set_adapters."""
    from pipeline.stickers.generation import StickerGenerator
    from pipeline.stickers.sticker_pipeline import StickerModels

    eager = StickerModels.create(models, cache_size=ROUND_ROBIN_STYLES, lcm_lora=str(lcm))
    rounds = 1 if (bench.args.quick or bench.args.tiny) else 3

    def stickers() -> dict[str, Any]:
        out = {"normal": sticker_latency(bench, eager, styles[0], fast=False)}
        if not bench.args.quick:
            out["fast_mode"] = sticker_latency(bench, eager, styles[0], fast=True)
        return out

    def switching() -> dict[str, Any]:
        out = {"cached_adapters": round_robin(bench, eager.generator, styles, rounds=rounds)}
        eager.generator.unload_all()
        reload = StickerGenerator(models.diffusion, cache_size=1)
        out["reload_from_disk"] = round_robin(bench, reload, styles, rounds=rounds)
        reload.unload_all()
        return out

    bench.section("stickers_eager", stickers)
    bench.section("style_switch_eager", switching)
    eager.generator.unload_all()


def compiled_serving(bench: Bench, models: Any, styles: list[Any], lcm: Path) -> None:
    """The fast path (STICKERBOT_COMPILE=on) on the same modules, after everything eager: its
    VAE decoder is compiled in place, which would charge compile time to later sections."""
    from pipeline.stickers.generation import StickerGenerator
    from pipeline.stickers.sticker_pipeline import StickerModels

    rounds = 1 if (bench.args.quick or bench.args.tiny) else 3
    holder: dict[str, Any] = {}

    def stickers() -> dict[str, Any]:
        start = time.perf_counter()
        holder["compiled"] = compiled = StickerModels(models=models, generator=StickerGenerator(
            models.diffusion, cache_size=ROUND_ROBIN_STYLES, lcm_lora=str(lcm), compile=True,
            compile_max_rank=STYLE_RANK, compile_backend=bench.args.compile_backend))
        out: dict[str, Any] = {"setup_s": round(time.perf_counter() - start, 2),
                               "normal": sticker_latency(bench, compiled, styles[0], fast=False)}
        if not bench.args.quick:
            out["fast_mode"] = sticker_latency(bench, compiled, styles[0], fast=True)
        return out

    def switching() -> dict[str, Any]:
        return {"hot_swap": round_robin(bench, holder["compiled"].generator, styles, rounds=rounds,
                                        generate=True)}

    bench.section("stickers_compiled", stickers)
    if "compiled" in holder:
        bench.section("style_switch_compiled", switching)


def class_images(bench: Bench, models: Any) -> dict[str, Any]:
    from pipeline.stickers.prompts import class_prompt
    from pipeline.training.class_images import ensure_class_images

    count = 4 if (bench.args.quick or bench.args.tiny) else 8
    steps = 2 if bench.args.tiny else 25
    start = time.perf_counter()
    ensure_class_images(models.diffusion, prompt=class_prompt("character"), count=count,
                        cache_dir=bench.root / "class-images-bench", steps=steps)
    bench.sync()
    seconds = time.perf_counter() - start
    return {"per_image_s": round(seconds / count, 3), "images": count, "sampler_steps": steps, "batch": 4}


def training(bench: Bench, models: Any) -> dict[str, Any]:
    """Steps/s after warm-up steps and peak VRAM, per profile, with and without prior."""
    from dataclasses import replace

    from pipeline.training.sticker_set import prepare_sticker_set
    from pipeline.training.trainer import TrainingConfig, train_style
    from segmentation.synthetic import sticker_files

    diffusion = models.diffusion
    prepared = prepare_sticker_set(sticker_files(4), resolution=diffusion.resolution)
    warm, steps = (1, 3) if bench.args.tiny else ((3, 10) if bench.args.quick else (3, 20))
    base = TrainingConfig(steps=warm + steps, batch_size=1, num_class_images=4, checkpoint_every=10_000,
                          class_image_steps=2 if bench.args.tiny else 25, seed=0)
    profiles = {"default": base, "low_memory": base.low_memory(),
                "full_finetune": replace(base, full_finetune=True)}
    if bench.args.quick:
        profiles = {"default": base}
    out: dict[str, Any] = {}
    for name, config in profiles.items():
        for prior in (False, True):
            run_config = replace(config, with_prior_preservation=prior)
            stamps: list[float] = []
            bench.peak_reset()
            tag = f"{name}-{'prior' if prior else 'noprior'}"
            train_style(diffusion, prepared, run_config, out_dir=bench.root / "train" / tag,
                        work_dir=bench.root / "train" / f"{tag}-work",
                        class_cache_dir=bench.root / "class-images",
                        progress=lambda p, s=stamps: (bench.sync(), s.append(time.perf_counter())))
            measured = stamps[warm:]
            rate = (len(measured) - 1) / (measured[-1] - measured[0]) if len(measured) > 1 else None
            out[f"{name} ({'with' if prior else 'no'} prior)"] = {
                "steps_per_s": round(rate, 2) if rate else None,
                "s_per_1000_steps": round(1000 / rate, 1) if rate else None,
                "peak_vram_gib": bench.peak_gib()}
    out["setup"] = f"512 px, batch 1, rank {base.rank}, {steps} steps timed after {warm}" \
        if not bench.args.tiny else "tiny models"
    return out


def segmenter(bench: Bench, models: Any) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from segmentation.removal import model_input_size, predict_alpha

    h, w = model_input_size(models.segmenter)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(8)]
    out: dict[str, Any] = {"size": f"{w}x{h}"}
    for batch in (1, 8):
        predict_alpha(models.segmenter, images[:batch], batch_size=batch)
        times = bench.timed(lambda b=batch: predict_alpha(models.segmenter, images[:b], batch_size=b),
                            bench.reps)
        out[f"batch {batch}"] = summary(times)
    return out


def captioner(bench: Bench, models: Any) -> dict[str, Any]:
    from PIL import Image

    from pipeline.stickers.captioning import caption_image

    image = Image.open(io.BytesIO(photo_bytes(models.diffusion.resolution))).convert("RGB")
    caption_image(models.captioner, image)
    times = bench.timed(lambda: caption_image(models.captioner, image), bench.reps)
    return {"caption": summary(times), "note": "random weights: the decoder runs to its length limit"}


def segmenter_training(bench: Bench, models: Any) -> dict[str, Any]:
    from pipeline.architectures import SD15, TINY
    from segmentation.synthetic import make_stickers
    from segmentation.training import SegTrainConfig, default_workers, fresh_segmenter, train_segmenter

    arch = TINY if bench.args.tiny else SD15
    size = 64 if bench.args.tiny else 256
    steps = 4 if bench.args.tiny else (20 if bench.args.quick else 60)
    batch = 4 if bench.args.tiny else 16
    seg = fresh_segmenter(arch.segformer, size, device=bench.device)
    config = SegTrainConfig(size=size, batch_size=batch, epochs=1, pairs_per_epoch=batch * steps,
                            val_pairs=batch, warmup_steps=1, workers=default_workers(bench.device))
    stamps: list[float] = []

    def step_done(p: Any) -> None:
        if p.val_iou is None:  # per step; the epoch's last call comes after validation
            bench.sync()
            stamps.append(time.perf_counter())

    train_segmenter(seg, make_stickers(12, size=size), bench.root / "segmenter", config, progress=step_done)
    measured = stamps[2:]  # the first steps start the pair workers
    rate = (len(measured) - 1) / (measured[-1] - measured[0]) if len(measured) > 1 else None
    return {"steps_per_s": round(rate, 2) if rate else None, "size": size, "batch": batch,
            "pair_workers": config.workers}


# --- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)  # None: run by the all-benchmarks runner
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing "
              "measured; benchmarks/README.md says how to run this on a GPU machine", flush=True)
        return NO_GPU_EXIT
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        bench = Bench(args, Path(tmp))
        if args.device == "cpu":
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        models = load(bench)
        wanted = {w for w in args.only.split(",") if w}
        serving = not wanted or any(w.startswith(("stickers", "style_switch")) for w in wanted)
        styles, lcm = write_styles(bench, models) if serving else ([], Path())
        bench.section("segmenter", lambda: segmenter(bench, models))
        bench.section("captioner", lambda: captioner(bench, models))
        if serving:
            eager_serving(bench, models, styles, lcm)
        bench.section("class_images", lambda: class_images(bench, models))
        bench.section("training", lambda: training(bench, models))
        bench.section("segmenter_training", lambda: segmenter_training(bench, models))
        if serving:
            compiled_serving(bench, models, styles, lcm)  # last: it compiles the shared VAE decoder
        bench.results["total_s"] = round(time.perf_counter() - start, 1)
        bench.write()
    print(f"wrote {args.out / JSON_NAME} and {args.out / MARKDOWN_NAME} "
          f"in {time.perf_counter() - start:.0f} s")
    failed = [k for k, v in bench.results["sections"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
