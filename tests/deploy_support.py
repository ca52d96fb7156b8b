"""What the deployment tests share: the project's nginx config, nginx to run it, and replicas
started the way the images start them (`python -m service`)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

NGINX_CONF = Path(__file__).resolve().parents[1] / "docker" / "nginx.conf"
STARTUP_TIMEOUT_S = 60


def debian_nginx() -> str:
    """Debian's nginx: on PATH, in /usr/sbin, or installed now with apt-get (root only)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("nginx is not installed and cannot be: installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if result.returncode != 0 or found is None:
        pytest.skip(f"`apt-get install nginx` failed: {result.stderr.strip()[-500:]}")
    return found


def main_conf(workdir: Path, site: Path) -> str:
    """What the nginx image's own /etc/nginx/nginx.conf provides around conf.d, rooted in workdir."""
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {workdir / kind};" for kind in kinds)
    return (
        f"{user}\ndaemon off;\nworker_processes 1;\npid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} info;\n"
        f"events {{ worker_connections 256; }}\nhttp {{ {temp} include {site}; }}\n"
    )


def wait_until_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def start_replica(host: str, port: int, workdir: Path) -> subprocess.Popen:
    """`python -m service` on host:port, on the CPU, one torch thread (replicas share the machine,
    as under compose); its output goes to workdir/replica-HOST-PORT.log."""
    env = {
        **os.environ,
        "ATTN_HOST": host,
        "ATTN_PORT": str(port),
        "ATTN_DEVICE": "cpu",
        "ATTN_LOG_LEVEL": "warning",
        "ATTN_TORCH_THREADS": "1",
    }
    with replica_log(host, port, workdir).open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "service"], cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def replica_log(host: str, port: int, workdir: Path) -> Path:
    return workdir / f"replica-{host}-{port}.log"


def stop_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
