# CPU image of stickerbot (bot + embedded worker). Build: docker build -t stickerbot .
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models STICKERBOT_DATA_DIR=/data
RUN useradd --create-home --uid 1000 stickerbot && mkdir -p /data /models \
    && chown stickerbot:stickerbot /data /models
WORKDIR /app
# torch first, from the CPU index, so the CUDA build is never pulled in.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY bot ./bot
COPY segmentation ./segmentation
RUN pip install ".[celery]"
USER stickerbot
VOLUME ["/data", "/models"]
CMD ["stickerbot", "run"]
