"""The Dockerfile and docker-compose.yml: parsed and checked for what a deployment relies on.

There is no Docker engine here, so nothing is built: these tests read the files the way Docker
does (line continuations, comments, ARG defaults in FROM) and check the stages, their base
images, the order of the torch install and the compose wiring.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ``${ARG}`` in FROM lines resolved."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, arg = line.partition(" ")
        op = op.upper()
        assert op in {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "VOLUME", "EXPOSE",
                      "HEALTHCHECK", "CMD", "ENTRYPOINT", "LABEL"}, f"unknown instruction {op}"
        if op == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arg.strip(), flags=re.IGNORECASE)
            assert m, f"every stage is named: {line!r}"
            base = re.sub(r"\$\{(\w+)\}", lambda g: global_args[g.group(1)], m.group(1))
            stages.append(Stage(m.group(2), base))
        elif not stages:
            assert op == "ARG", f"only ARG may come before the first FROM, not {op}"
            name, _, default = arg.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append((op, arg.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage], list[Stage]]:
    args, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    return args, {s.name: s for s in stages}, stages


def test_stages_name_the_expected_base_images(dockerfile) -> None:
    _args, by_name, stages = dockerfile
    assert set(by_name) == {"bot", "worker", "cpu"}
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", by_name["bot"].base)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", by_name["cpu"].base)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+",
                        by_name["worker"].base)
    # `docker build .` without --target builds the last stage: the CPU image.
    assert stages[-1].name == "cpu"


def _pip_installs(stage: Stage) -> list[str]:
    return [cmd for cmd in stage.all("RUN") if "pip install" in cmd]


def test_torch_comes_first_from_the_index_of_its_flavour(dockerfile) -> None:
    args, by_name, _stages = dockerfile
    assert args["TORCH_CPU_INDEX"].endswith("/whl/cpu")
    assert re.search(r"/whl/cu\d+$", args["TORCH_CUDA_INDEX"])
    assert re.fullmatch(r"torch==[\d.]+", args["TORCH_SPEC"]), "torch is pinned"
    for name, index_arg in (("cpu", "TORCH_CPU_INDEX"), ("worker", "TORCH_CUDA_INDEX")):
        installs = _pip_installs(by_name[name])
        assert "${TORCH_SPEC}" in installs[0] and f"--index-url ${{{index_arg}}}" in installs[0], name
        assert any(re.search(r'pip install "?\.(\[celery(,emoji)?\])?"?$', cmd) for cmd in installs[1:]), name
        assert {"TORCH_SPEC", index_arg} <= {a.split("=")[0] for a in by_name[name].all("ARG")}


def test_bot_image_has_no_torch(dockerfile) -> None:
    _args, by_name, _stages = dockerfile
    installs = " ".join(_pip_installs(by_name["bot"]))
    for heavy in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        assert heavy not in installs
    assert "pip install --no-deps ." in installs
    assert "aiogram" in installs and "celery[redis]" in installs


def test_runtime_stages_run_as_a_non_root_user_with_volumes(dockerfile) -> None:
    _args, by_name, _stages = dockerfile
    for stage in by_name.values():
        users = stage.all("USER")
        assert users and users[-1] not in ("root", "0"), stage.name
        run_after_user = [op for op, _ in stage.instructions[
            max(i for i, (op, _) in enumerate(stage.instructions) if op == "USER"):] if op == "RUN"]
        assert not run_after_user, f"{stage.name}: RUN after USER would need root"
        volumes = " ".join(stage.all("VOLUME"))
        assert "/data" in volumes, stage.name
    for name in ("worker", "cpu"):
        assert "/models" in " ".join(by_name[name].all("VOLUME"))
        env = " ".join(by_name[name].all("ENV"))
        assert "HF_HOME=/models" in env


def test_copied_paths_exist_and_commands_are_real(dockerfile) -> None:
    _args, by_name, _stages = dockerfile
    for stage in by_name.values():
        for copy in stage.all("COPY"):
            *sources, _dest = shlex.split(copy)
            for src in sources:
                assert (ROOT / src).exists(), f"{stage.name}: COPY {src} does not exist"
    worker_cmd = by_name["worker"].all("CMD")[-1]
    for needed in ("pipeline.celery_app", "solo", "sticker,train"):
        assert needed in worker_cmd
    assert (ROOT / "pipeline" / "celery_app.py").exists()


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_wires_bot_redis_and_gpu_workers(compose, dockerfile) -> None:
    services = compose["services"]
    assert {"bot", "redis"} <= set(services)
    workers = [name for name in services if name.startswith("worker")]
    assert len(workers) >= 2, "an example with more than one worker"
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has a healthcheck"
    assert services["bot"]["build"]["target"] == "bot"
    gpu_ids = []
    for name in workers:
        svc = services[name]
        assert svc["build"]["target"] == "worker"
        assert svc["environment"]["STICKERBOT_QUEUE_BACKEND"] == "celery"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        gpu_ids += devices[0]["device_ids"]
        assert any(v.startswith("data:/data") for v in svc["volumes"])
        assert any(v.startswith("models:/models") for v in svc["volumes"])
    assert len(gpu_ids) == len(set(gpu_ids)), "each worker reserves its own GPU"
    assert services["bot"]["environment"]["STICKERBOT_QUEUE_BACKEND"] == "celery"
    assert any(v.startswith("data:/data") for v in services["bot"]["volumes"])
    assert {"data", "models", "redis"} <= set(compose["volumes"])
    # The health probes hit the metrics ports the images expose.
    _args, by_name, _stages = dockerfile
    assert "9100" in " ".join(services["bot"]["healthcheck"]["test"])
    assert "9100" in " ".join(by_name["bot"].all("EXPOSE"))
    assert "9101" in " ".join(services[workers[0]]["healthcheck"]["test"])
    assert "9101" in " ".join(by_name["worker"].all("EXPOSE"))
    assert "appendonly" in " ".join(services["redis"]["command"])
