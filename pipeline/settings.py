"""All of stickerbot's configuration: one pydantic-settings class, read once in ``main()``.

Environment variables (and a ``.env`` file) set it. Operators type ``BOT_TOKEN``,
``TELEGRAM_API_BASE``, ``STICKERBOT_PRESET`` and ``STICKERBOT_DATA_DIR``; every other setting is
``STICKERBOT_<FIELD NAME IN CAPITALS>``. ``.env.example`` lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.errors import ConfigError

Preset = Literal["sd15", "tiny"]

ENV_PREFIX = "STICKERBOT_"
# Fields whose environment names do not carry the prefix: what operators already type.
_PLAIN_ENV_NAMES = {
    "bot_token": "BOT_TOKEN",
    "telegram_api_base": "TELEGRAM_API_BASE",
}


class Settings(BaseSettings):
    """stickerbot's settings. Build with :func:`load_settings` to get errors that name variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
    )

    # --- Telegram -------------------------------------------------------------------------
    bot_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("BOT_TOKEN", "STICKERBOT_BOT_TOKEN", "bot_token")
    )
    telegram_api_base: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "TELEGRAM_API_BASE", "STICKERBOT_TELEGRAM_API_BASE", "telegram_api_base"
        ),
    )
    admin_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    default_language: Literal["en", "ru"] = "en"
    pack_prefix: str = "style"

    # --- Files ----------------------------------------------------------------------------
    data_dir: Path = Path("data")
    database_path: Path | None = None  # default: <data_dir>/stickerbot.sqlite3

    # --- Models ---------------------------------------------------------------------------
    preset: Preset = "sd15"
    # Per-model overrides: a Hugging Face id or a local directory. Empty = the preset's model.
    diffusion_model: str | None = None
    captioner_model: str | None = None
    segmenter_model: str | None = None
    clip_model: str | None = None
    dino_model: str | None = None
    lcm_lora: str | None = None  # an LCM-LoRA id or path enables the fast 4-step mode
    # Serving fast path (torch.compile, LoRA hot-swap): off until `python -m benchmarks gpu` has
    # shown it faster on a GPU; auto = on where a CUDA GPU is found.
    compile: Literal["auto", "on", "off"] = "off"
    compile_max_rank: int = Field(default=16, ge=1, le=256)  # largest LoRA rank the slot takes
    model_cache_dir: Path | None = None  # Hugging Face cache; default: the hub's own
    tiny_zoo_dir: Path | None = None  # default: <data_dir>/tiny-zoo
    # The diffusion repository's NSFW classifier: a flagged sticker is never sent. On by default.
    safety_checker: bool = True
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Training autocast: auto follows the resident weights (float16: fp16 + GradScaler,
    # bfloat16: bf16, float32: none); fp16 / bf16 force one, no turns it off.
    train_mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"

    # --- Background remover ---------------------------------------------------------------
    # Where a bootstrap starts: the configured pretrained encoder, or random weights (no
    # pretrained weights at all: for operators who may not use the NVIDIA SegFormer licence).
    segmenter_bootstrap_from: Literal["pretrained", "scratch"] = "pretrained"
    segmenter_bootstrap_minutes: float = Field(default=5.0, gt=0)  # training time of a bootstrap
    segmenter_refresh_every: int = Field(default=500, ge=0)  # new alpha stickers per refresh (0: never)
    segmenter_refresh_minutes: float = Field(default=3.0, gt=0)
    segmenter_train_size: int = Field(default=384, ge=32, le=1024)  # px; the remover then runs at it
    segmenter_emoji: bool = True  # Twemoji (fetched from the npm registry) in the training data
    # Operator's own folders of transparent stickers to train on (comma-separated).
    segmenter_extra_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    emoji_registry: str = "https://registry.npmjs.org"

    # --- Queue and worker -----------------------------------------------------------------
    queue_backend: Literal["sqlite", "celery"] = "sqlite"
    redis_url: str = "redis://localhost:6379/0"
    adapter_cache_size: int = Field(default=4, ge=1, le=256)
    lease_seconds: float = Field(default=30.0, gt=1)
    max_attempts: int = Field(default=3, ge=1, le=20)
    # Celery: seconds before an unacknowledged job goes to another worker (its worker died).
    # Must be longer than the longest training run, or a running job would be handed out twice.
    celery_visibility_timeout: float = Field(default=6 * 3600.0, gt=0)
    # A worker whose models fail to load tries again after this many seconds, doubling each
    # time up to the cap (pipeline/worker_health.py); doctor and /stats show why.
    model_load_retry_seconds: float = Field(default=5.0, gt=0)
    model_load_retry_max_seconds: float = Field(default=300.0, gt=0)

    # --- Quotas ---------------------------------------------------------------------------
    max_queued_jobs_per_user: int = Field(default=3, ge=1)
    stickers_per_day: int = Field(default=100, ge=0)
    styles_per_user: int = Field(default=5, ge=1)
    max_images_per_set: int = Field(default=120, ge=3, le=1000)
    max_image_pixels: int = Field(default=40_000_000, ge=1024)

    # --- Operations -----------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with job/user ids
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # the bot's /metrics
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)  # each worker's /metrics

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p for p in value.replace(" ", ",").split(",") if p]
            return [int(p) for p in parts]
        return value

    @field_validator("segmenter_extra_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [Path(p.strip()) for p in value.split(",") if p.strip()]
        return value

    @field_validator("telegram_api_base")
    @classmethod
    def _check_base(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://localhost:8081")
        return value.rstrip("/")

    @field_validator("pack_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or not value[0].isalpha() or not value.replace("_", "").isalnum() or "__" in value:
            raise ValueError("must start with a letter and hold only letters, digits, single _")
        return value

    # --- Derived paths --------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.database_path or self.data_dir / "stickerbot.sqlite3"

    @property
    def zoo_dir(self) -> Path:
        return self.tiny_zoo_dir or self.data_dir / "tiny-zoo"

    def require_token(self) -> SecretStr:
        """The bot token, or a ConfigError that says how to get one."""
        if self.bot_token is None or not self.bot_token.get_secret_value().strip():
            raise ConfigError(
                "BOT_TOKEN is not set. Create a bot with @BotFather in Telegram "
                "(https://t.me/BotFather, command /newbot), then put BOT_TOKEN=<token> in .env "
                "or the environment."
            )
        token = self.bot_token.get_secret_value()
        head, _, tail = token.partition(":")
        if not head.isdigit() or len(tail) < 20:
            raise ConfigError(
                "BOT_TOKEN is malformed: expected '<digits>:<secret>' as @BotFather gives it."
            )
        return self.bot_token


def env_name(field: str) -> str:
    """The environment variable an operator sets for ``field``."""
    return _PLAIN_ENV_NAMES.get(field, ENV_PREFIX + field.upper())


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings once; a bad value raises ConfigError naming its variable.

    The message never repeats the offending value, so a token pasted into the wrong variable
    does not end up in a log.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = err.get("loc") or ("?",)
            field = str(loc[0])
            # Aliased fields report the alias they were read from.
            field = {"BOT_TOKEN": "bot_token", "TELEGRAM_API_BASE": "telegram_api_base"}.get(
                field, field
            )
            problems.append(f"{env_name(field)}: {err.get('msg', 'invalid value')}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
