"""Hyperparameter sweeps: train and evaluate every combination of a grid, then tabulate.

    grid  "lr=1e-4,1e-5" "rank=4,16,64" "text_encoder=0,1" "prior=0,1"

Each key is a :class:`pipeline.training.trainer.TrainingConfig` field or one of the short names in
``GRID_ALIASES``; values are parsed by the field's type (``0``/``1``/``true``/``false`` for
switches). A sweep prepares the sticker set once, encodes the references once, shares one
class-image cache between all runs (prior preservation generates its class images once), and
skips training a combination whose finished style is already in its run directory (so an
interrupted sweep continues where it stopped).

    <out dir>/
        run-00/style/      the trained style (with intermediate/ when asked for)
        run-00/eval/       metrics.json, contact_sheet.png
        sweep.md           the table, best value per metric column in bold
        sweep.csv          the same numbers, plain, with a ``best`` column
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, StyleError
from pipeline.quality.evaluation import EvaluationConfig, ReferenceSet, evaluate_style
from pipeline.quality.metrics import METRIC_LABELS, METRICS, Lpips, StyleScores, load_lpips
from pipeline.storage.files import write_atomic
from pipeline.training.style import read_style

log = logging.getLogger(__name__)

# Short grid names -> TrainingConfig fields (the names the public reports use).
GRID_ALIASES = {
    "lr": "lr",
    "rank": "rank",
    "alpha": "lora_alpha",
    "text_encoder": "train_text_encoder",
    "prior": "with_prior_preservation",
    "steps": "steps",
    "batch": "batch_size",
    "snr": "min_snr_gamma",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _config_types() -> dict[str, Any]:
    from pipeline.training.trainer import TrainingConfig

    return typing.get_type_hints(TrainingConfig)


def _parse_value(key: str, raw: str, hint: Any) -> Any:
    """``raw`` as the field's type: bool, int, float, str, or None for an optional field."""
    text = raw.strip()
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", "default"):
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and base is None:
        base = str
    try:
        if base is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if base is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if base is float:
            return float(text)
        if base is str or typing.get_origin(base) is typing.Literal:
            return text
    except ValueError:
        kind = {bool: "0 or 1", int: "an integer", float: "a number"}.get(base, str(base))
        raise InputError(f"grid {key}: {raw!r} is not {kind}") from None
    raise InputError(f"grid {key}: this setting cannot be swept from the command line")


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=1e-4,1e-5", "rank=4,16"]`` -> ``{"lr": [1e-4, 1e-5], "rank": [4, 16]}`` (user keys,
    typed values, order kept). Specs may also come as one space-separated string."""
    hints = _config_types()
    grid: dict[str, list[Any]] = {}
    tokens = [tok for spec in specs for tok in spec.split()]
    if not tokens:
        raise InputError("the grid is empty: give settings like lr=1e-4,1e-5 rank=4,16")
    for tok in tokens:
        key, sep, values = tok.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip(",").strip():
            raise InputError(f"grid entry {tok!r} is not KEY=V1,V2,...")
        name = GRID_ALIASES.get(key, key)
        if name not in hints:
            known = ", ".join(sorted(GRID_ALIASES))
            raise InputError(f"unknown grid key {key!r}: use one of {known}, or a TrainingConfig field")
        if key in grid or any(GRID_ALIASES.get(k, k) == name for k in grid):
            raise InputError(f"grid key {key!r} is given twice")
        parsed = [_parse_value(key, v, hints[name]) for v in values.split(",") if v.strip()]
        if len(set(map(repr, parsed))) != len(parsed):
            raise InputError(f"grid {key}: a value is repeated")
        grid[key] = parsed
    return grid


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the last key varying fastest (as nested loops would)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def config_for(base: Any, params: dict[str, Any]) -> Any:
    """``base`` (a TrainingConfig) with the combination applied; invalid ones fail here, early."""
    overrides = {GRID_ALIASES.get(k, k): v for k, v in params.items()}
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise InputError(f"grid combination {format_params(params)}: {exc}") from exc


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# --- Results and tables -----------------------------------------------------------------------


@dataclass
class SweepRow:
    params: dict[str, Any]
    scores: StyleScores
    style_dir: Path
    train_seconds: float
    eval_seconds: float
    loss: float | None  # final training loss (None when the style was reused)
    reused: bool = False


@dataclass
class SweepResult:
    keys: list[str]
    rows: list[SweepRow]
    markdown_path: Path | None = None
    csv_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def best(self) -> dict[str, set[int]]:
        return best_per_column([r.scores for r in self.rows])


def best_per_column(scores: Sequence[StyleScores]) -> dict[str, set[int]]:
    """metric -> indices of the rows holding its best value (ties all marked; rows without a
    value never are). Higher is better for every metric."""
    best: dict[str, set[int]] = {}
    for metric in METRICS:
        values = [(i, s.get(metric)) for i, s in enumerate(scores)]
        present = [(i, v) for i, v in values if v is not None]
        if not present:
            best[metric] = set()
            continue
        top = max(v for _, v in present)
        best[metric] = {i for i, v in present if v >= top - 1e-12}
    return best


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_markdown(result: SweepResult) -> str:
    """One row per setting: its grid values, CLIP-I / DINO / CLIP-T / diversity (best in bold),
    training time. Notes (why diversity is missing) follow the table."""
    best = result.best()
    header = [*result.keys, *(METRIC_LABELS[m] for m in METRICS), "train s"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < len(result.keys) else "---:" for i in range(len(header))) + "|"]
    for i, row in enumerate(result.rows):
        cells = [_fmt_value(row.params[k]) for k in result.keys]
        for m in METRICS:
            text = _cell(row.scores.get(m))
            cells.append(f"**{text}**" if i in best[m] else text)
        cells.append(f"{row.train_seconds:.1f}" + (" (reused)" if row.reused else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Best value per metric column in **bold** (higher is better).")
    lines.extend(f"Note: {n}" for n in result.notes)
    return "\n".join(lines) + "\n"


def format_csv(result: SweepResult) -> str:
    best = result.best()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*result.keys, *METRICS, "train_seconds", "eval_seconds", "loss", "best", "style_dir"])
    for i, row in enumerate(result.rows):
        writer.writerow([
            *(_fmt_value(row.params[k]) for k in result.keys),
            *("" if row.scores.get(m) is None else f"{row.scores.get(m):.6f}" for m in METRICS),
            f"{row.train_seconds:.3f}", f"{row.eval_seconds:.3f}",
            "" if row.loss is None else f"{row.loss:.6f}",
            ";".join(m for m in METRICS if i in best[m]),
            str(row.style_dir),
        ])
    return buf.getvalue()


def write_tables(result: SweepResult, out_dir: Path) -> None:
    result.markdown_path = out_dir / "sweep.md"
    result.csv_path = out_dir / "sweep.csv"
    write_atomic(result.markdown_path, format_markdown(result).encode())
    write_atomic(result.csv_path, format_csv(result).encode())


# --- The orchestrating function ---------------------------------------------------------------


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _finished_style(style_dir: Path, config: Any, prepared: Any) -> bool:
    """A run directory already holds this combination's finished style, trained on this set."""
    try:
        info = read_style(style_dir)
    except StyleError:
        return False
    return bool(info.train_set_sha256 == prepared.sha256
                and _plain(dataclasses.asdict(config)) == _plain(info.extra.get("config", {})))


def _finished_evaluation(eval_dir: Path, style_dir: Path, config: EvaluationConfig, resolution: int,
                         templates: Sequence[str] | None) -> tuple[StyleScores, float] | None:
    """The scores already in ``eval_dir`` when they were made from this very style (its
    creation time), with these settings and prompts; None otherwise."""
    from pipeline.quality.evaluation import DEFAULT_PROMPTS

    try:
        report = json.loads((eval_dir / "metrics.json").read_text())
        info = read_style(style_dir)
        wanted = list(templates) if templates is not None else [t for _, t in DEFAULT_PROMPTS]
        if config.max_prompts is not None:
            wanted = wanted[: config.max_prompts]
        same = (report["style"]["created_at"] == info.created_at
                and report["templates"] == wanted
                and report["config"] == _plain(dataclasses.asdict(config) | {"resolution": resolution}))
        return (StyleScores(**report["scores"]), float(report["seconds"])) if same else None
    except (OSError, ValueError, KeyError, TypeError, StyleError):
        return None


def run_sweep(
    diffusion: Any,
    prepared: Any,
    grid: dict[str, list[Any]],
    *,
    clip: Any,
    dino: Any,
    out_dir: str | Path,
    class_cache_dir: str | Path,
    base_config: Any = None,
    eval_config: EvaluationConfig | None = None,
    templates: Sequence[str] | None = None,
    lpips: Lpips | None = None,
    log_line: Callable[[str], None] | None = None,
) -> SweepResult:
    """Train and evaluate every combination of ``grid`` on ``prepared`` (a PreparedSet)."""
    from pipeline.training.trainer import TrainingConfig, train_style

    say = log_line or log.info
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. every combination's config, built (and validated) before anything trains
    base = base_config if base_config is not None else TrainingConfig()
    eval_config = eval_config or EvaluationConfig()
    combos = combinations(grid)
    configs = [config_for(base, params) for params in combos]

    # 2. the references, encoded once
    references = ReferenceSet.from_images(prepared.images, clip=clip, dino=dino)
    lp = lpips if lpips is not None else load_lpips(device=diffusion.device)
    resolution = eval_config.resolution or diffusion.resolution
    result = SweepResult(keys=list(grid), rows=[])
    if not lp.available and lp.reason:
        result.notes.append(lp.reason)

    # 3. train and evaluate each combination
    for n, (params, config) in enumerate(zip(combos, configs, strict=True)):
        run_dir = out / f"run-{n:02d}"
        style_dir = run_dir / "style"
        label = format_params(params)
        reused = _finished_style(style_dir, config, prepared)
        loss: float | None = None
        if reused:
            say(f"[{n + 1}/{len(combos)}] {label}: reusing the trained style in {style_dir}")
            train_seconds = float(read_style(style_dir).timings.get("total", 0.0))
        else:
            say(f"[{n + 1}/{len(combos)}] {label}: training")
            trained = train_style(diffusion, prepared, config, out_dir=style_dir,
                                  work_dir=run_dir / "work", class_cache_dir=Path(class_cache_dir))
            train_seconds, loss = trained.seconds, trained.loss
        previous = (_finished_evaluation(run_dir / "eval", style_dir, eval_config, resolution, templates)
                    if reused else None)
        if previous is not None:
            s, eval_seconds = previous
        else:
            evaluation = evaluate_style(diffusion, style_dir, references, clip=clip, dino=dino,
                                        out_dir=run_dir / "eval", templates=templates,
                                        config=eval_config, lpips=lp, save_images=False)
            s, eval_seconds = evaluation.scores, evaluation.seconds
        say(f"[{n + 1}/{len(combos)}] {label}: CLIP-I {s.clip_i:.4f}  DINO {s.dino:.4f}  "
            f"CLIP-T {s.clip_t:.4f}" + ("  (scores reused)" if previous is not None else ""))
        result.rows.append(SweepRow(params=params, scores=s, style_dir=style_dir,
                                    train_seconds=train_seconds, eval_seconds=eval_seconds,
                                    loss=loss, reused=reused))
        # The table is rewritten after every run: an interrupted sweep still leaves one.
        write_tables(result, out)
    return result
