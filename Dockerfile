# syntax=docker/dockerfile:1
# stickerbot images, one Dockerfile, three targets:
#
#   docker build --target bot    -t stickerbot-bot .     # slim: the Telegram bot, no torch
#   docker build --target worker -t stickerbot-worker .  # CUDA runtime: one Celery GPU worker
#   docker build                 -t stickerbot .         # CPU all-in-one (bot + embedded worker)
#
# Every runtime stage runs as the non-root user `stickerbot` (uid 10001; uid 1000 is taken by
# `ubuntu` in the CUDA image) and keeps its state in two volumes:
#   /data    the shared data dir (database, sticker sets, styles, checkpoints, results); every
#            worker of a scale-out deployment mounts the same one
#   /models  the Hugging Face cache (HF_HOME): downloaded once, survives image upgrades
# docs/scale-out.md explains the deployment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# The torch build is pinned and installed before anything else, from the index of its flavour,
# so pip never swaps it for another build (a bare `torch` would pull several GB of CUDA wheels
# into the CPU image).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------------------------------------
# The bot: no torch, no model libraries (the bot never imports them). The package is installed
# without its dependencies, then with exactly what the bot and the Celery client need.
FROM ${PYTHON_IMAGE} AS bot
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    STICKERBOT_DATA_DIR=/data STICKERBOT_METRICS_PORT=9100
RUN useradd --create-home --uid 10001 stickerbot && mkdir -p /data /models \
    && chown stickerbot:stickerbot /data /models
WORKDIR /app
RUN pip install "aiogram>=3.15,<4" "aiosqlite>=0.20,<1" "pydantic>=2.7,<3" \
        "pydantic-settings>=2.7,<3" "pillow>=10.4" "numpy>=1.26" "prometheus-client>=0.20" \
        "celery[redis]>=5.4,<6" "redis>=5"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY bot ./bot
COPY segmentation ./segmentation
RUN pip install --no-deps .
USER stickerbot
VOLUME ["/data"]
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"
CMD ["stickerbot", "bot"]

# ---------------------------------------------------------------------------------------------
# A GPU worker: CUDA runtime base, the CUDA torch wheel, the full package. One container per GPU,
# each a Celery worker with the solo pool (one job at a time on its GPU).
FROM ${CUDA_IMAGE} AS worker
ARG TORCH_SPEC
ARG TORCH_CUDA_INDEX
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models STICKERBOT_DATA_DIR=/data STICKERBOT_QUEUE_BACKEND=celery \
    STICKERBOT_DEVICE=cuda STICKERBOT_WORKER_METRICS_PORT=9101
# Ubuntu 24.04's Python is 3.12 (the package needs >= 3.11).
# libcairo2: the emoji extra rasterises Twemoji for the background remover's bootstrap.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libcairo2 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 stickerbot && mkdir -p /data /models \
    && chown stickerbot:stickerbot /data /models
WORKDIR /app
RUN pip install --index-url ${TORCH_CUDA_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY bot ./bot
COPY segmentation ./segmentation
RUN pip install ".[celery,emoji]"
USER stickerbot
VOLUME ["/data", "/models"]
EXPOSE 9101
# The metrics endpoint answers from its own thread, also while the solo pool runs a long job
# (a `celery inspect ping` would time out during training).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9101/metrics', timeout=4)"
CMD ["celery", "-A", "pipeline.celery_app", "worker", "--pool", "solo", "--concurrency", "1", \
     "--queues", "sticker,train", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]

# ---------------------------------------------------------------------------------------------
# The CPU all-in-one image (the default target, built last): bot and embedded worker in one
# container, `stickerbot run`. Fine for the tiny preset and trying the flow; slow for sd15.
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_SPEC
ARG TORCH_CPU_INDEX
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models STICKERBOT_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends libcairo2 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 stickerbot && mkdir -p /data /models \
    && chown stickerbot:stickerbot /data /models
WORKDIR /app
RUN pip install --index-url ${TORCH_CPU_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY bot ./bot
COPY segmentation ./segmentation
RUN pip install ".[celery,emoji]"
USER stickerbot
VOLUME ["/data", "/models"]
CMD ["stickerbot", "run"]
