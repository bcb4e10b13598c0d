"""``python -m benchmarks gpu``: one line and status 3 without a GPU; on the CPU with tiny models
(its hidden ``--device cpu --tiny`` flags) it runs and writes valid JSON and Markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_no_gpu_is_one_line_within_seconds() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 3
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("no CUDA GPU")
    assert time.perf_counter() - start < 60  # seconds on an idle machine; generous when shared


def run_tiny(out: Path, zoo: Path, *extra: str) -> dict:
    from benchmarks.bench_gpu import JSON_NAME, MARKDOWN_NAME, main

    rc = main(["--device", "cpu", "--tiny", "--quick", "--compile-backend", "eager",
               "--zoo-dir", str(zoo), "--out", str(out), *extra])
    assert rc == 0
    results = json.loads((out / JSON_NAME).read_text())
    markdown = (out / MARKDOWN_NAME).read_text()
    assert results["tiny"] and "TINY MODELS" in markdown
    for name, section in results["sections"].items():
        assert "error" not in section, (name, section)
        assert f"| {name} |" in markdown
    return results


def test_tiny_sections_write_json_and_markdown(tmp_path: Path, tiny_zoo: Path) -> None:
    results = run_tiny(tmp_path / "out", tiny_zoo, "--only", "segmenter,captioner")
    assert set(results["sections"]) == {"segmenter", "captioner"}
    seg = results["sections"]["segmenter"]
    assert seg["batch 1"]["p50_ms"] > 0 and seg["batch 8"]["runs"] == 2
    assert results["sections"]["captioner"]["caption"]["p50_ms"] > 0


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path: Path, tiny_zoo: Path) -> None:
    results = run_tiny(tmp_path / "out", tiny_zoo)
    sections = results["sections"]
    assert set(sections) == {"segmenter", "captioner", "stickers_eager", "style_switch_eager",
                             "class_images", "training", "segmenter_training", "stickers_compiled",
                             "style_switch_compiled"}
    assert sections["stickers_compiled"]["normal"]["diffusion"]["p50_ms"] > 0
    hot = sections["style_switch_compiled"]["hot_swap"]
    assert hot["graphs_compiled_after_first_round"] == 0 and hot["disk_loads"] == 8  # first round
    assert sections["style_switch_eager"]["reload_from_disk"]["disk_loads"] == 16
    assert sections["training"]["default (with prior)"]["steps_per_s"] > 0
