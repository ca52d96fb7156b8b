"""The compose topology for real, on loopback: Debian's nginx running docker/nginx.conf in front of
two replicas started as the image starts them (`python -m service`). Requests spread over both;
one replica goes away mid-load and no request is lost while the survivor carries on (and when
it goes too, nginx answers a JSON 503 with Retry-After):

- stopped (SIGTERM, as `docker compose stop` or a rolling update does): nginx alone keeps every
  request whole, resending to the survivor whatever the stopping replica refuses;
- crashed (SIGKILL): nginx resends every request the dead replica had not begun to answer. One
  whose response it had begun to send when it died (the header already relayed to the client, the
  body cut) cannot be resent by nginx; the client resends it, which is safe because POST
  /attention is a pure computation. There are at most as many of those as requests in flight.

docker/nginx.conf is used as written except for what only docker has: the upstream's server line
(`service:8000 resolve`, docker's DNS) becomes one loopback server per replica, and the listen port
is a free loopback port. nginx is installed with apt-get when missing (root on Debian/Ubuntu, as on
CI); elsewhere the test skips and says why.
"""

from __future__ import annotations

import base64
import itertools
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from deploy_support import (
    NGINX_CONF,
    debian_nginx,
    main_conf,
    replica_log,
    start_replica,
    stop_all,
    wait_until_ready,
)

from engine import attention
from service.loadtest import free_port

CLIENTS = 4  # concurrent client threads
BEFORE_KILL = 40  # requests completed before one replica is killed
AFTER_KILL = 60  # requests completed after it
PATTERNS = [
    {"type": "dense"},
    {"type": "sliding_window", "window": 8},
    {"type": "strided", "stride": 4},
    {"type": "fixed", "block": 8, "summary": 2},
]


def render_for_loopback(conf: str, replica_ports: list[int], listen_port: int) -> str:
    """docker/nginx.conf with docker's DNS swapped for loopback replicas; nothing else changed."""
    server_line = re.compile(r"^(?P<indent>[ \t]*)server service:8000 resolve(?P<params>[^;]*);$", re.M)
    (match,) = list(server_line.finditer(conf)) or [None]
    assert match, "docker/nginx.conf no longer has `server service:8000 resolve ...;`: update this test"
    servers = "\n".join(f"{match['indent']}server 127.0.0.1:{port}{match['params']};" for port in replica_ports)
    conf = conf[: match.start()] + servers + conf[match.end() :]
    # `resolver` in an upstream block needs nginx >= 1.27.3 (the image's); it only serves "resolve".
    conf, resolvers = re.subn(r"^[ \t]*resolver [^;]*;\n", "", conf, flags=re.M)
    conf, listens = re.subn(r"^([ \t]*)listen 8080;$", rf"\1listen 127.0.0.1:{listen_port};", conf, flags=re.M)
    assert resolvers == 1 and listens == 1, "docker/nginx.conf changed shape: update this test"
    return conf


def tensor(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": "float32", "b64": base64.b64encode(t.numpy().tobytes()).decode()}


def request_inputs(i: int):
    """Distinct inputs per request, so that any answer swapped or lost shows."""
    g = torch.Generator().manual_seed(i)
    q = torch.randn(1, 4, 32, 16, generator=g)
    k = torch.randn(1, 2, 32, 16, generator=g)
    v = torch.randn(1, 2, 32, 16, generator=g)
    return q, k, v, PATTERNS[i % len(PATTERNS)]


@dataclass
class Answer:
    index: int
    started: float  # time.monotonic() when the request was first sent
    status: int
    body: dict | str
    request_id: str | None
    resent_by_client: bool  # its first response was cut off mid-way, so the client sent it again


class Load:
    """CLIENTS threads posting distinct requests through nginx until stopped; each resends once a
    request whose response was cut off (the only failure nginx cannot hide, see the docstring)."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[Answer] = []
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def done(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_for(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.done() < count:
            assert time.monotonic() < deadline, f"only {self.done()} of {count} requests answered in {timeout_s} s"
            time.sleep(0.02)

    def _client(self) -> None:
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not self._stop.is_set():
                with self._lock:
                    i = next(self._next)
                q, k, v, pattern = request_inputs(i)
                body = {"q": tensor(q), "k": tensor(k), "v": tensor(v), "pattern": pattern}
                started = time.monotonic()
                for resent in (False, True):
                    try:
                        r = client.post(self.url, json=body, headers={"X-Request-ID": f"topo-{i}"})
                        answer = Answer(i, started, r.status_code, r.json() if r.status_code == 200 else r.text,
                                        r.headers.get("x-request-id"), resent)
                        break
                    except (httpx.RemoteProtocolError, httpx.ReadError) as e:  # cut off: resend once
                        answer = Answer(i, started, 0, repr(e), None, resent)
                    except (httpx.HTTPError, ValueError) as e:  # lost or garbled otherwise: a failed answer
                        answer = Answer(i, started, 0, repr(e), None, resent)
                        break
                with self._lock:
                    self.answers.append(answer)


def served_by(access_log: Path) -> dict[str, list[str]]:
    """request id -> the upstreams nginx tried, in order, from docker/nginx.conf's log format."""
    tried = {}
    for line in access_log.read_text().splitlines():
        m = re.search(r"rid=(\S+) upstream=(.*) upstream_status=", line)
        if m and m[1].startswith("topo-"):
            tried[m[1]] = [upstream.strip() for upstream in m[2].split(",")]
    return tried


@pytest.fixture
def topology(tmp_path):
    nginx = debian_nginx()
    ports = [free_port() for _ in range(2)]
    procs = []
    try:
        replicas = [(port, start_replica("127.0.0.1", port, tmp_path)) for port in ports]
        procs += [proc for _, proc in replicas]
        for port, proc in replicas:  # both start at once; this waits for the slower
            wait_until_ready(f"http://127.0.0.1:{port}/readyz", proc, replica_log("127.0.0.1", port, tmp_path))

        listen = free_port()
        site = tmp_path / "site.conf"
        site.write_text(render_for_loopback(NGINX_CONF.read_text(), ports, listen))
        conf = tmp_path / "nginx.conf"
        conf.write_text(main_conf(tmp_path, site))
        check = subprocess.run([nginx, "-t", "-c", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        access_log = tmp_path / "access.log"
        with access_log.open("w") as out:  # the config logs to /dev/stdout, as in the container
            procs.append(subprocess.Popen([nginx, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT))
        wait_until_ready(f"http://127.0.0.1:{listen}/healthz", procs[-1], access_log)
        yield {"url": f"http://127.0.0.1:{listen}", "replicas": replicas, "access_log": access_log}
    finally:
        stop_all(procs)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
def test_replicas_share_the_load_and_one_going_away_loses_no_request(topology, stop):
    url, access_log = topology["url"], topology["access_log"]
    (victim_port, victim), (survivor_port, survivor) = topology["replicas"]
    victim_addr, survivor_addr = f"127.0.0.1:{victim_port}", f"127.0.0.1:{survivor_port}"

    with Load(f"{url}/attention") as load:
        load.wait_for(BEFORE_KILL)
        victim.send_signal(stop)
        victim.wait(timeout=30)
        killed_at = time.monotonic()
        load.wait_for(load.done() + AFTER_KILL)
    answers = sorted(load.answers, key=lambda a: a.index)

    # No request lost: every one answered 200, with its own id and its own result.
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    resent_by_client = [a.index for a in answers if a.resent_by_client]
    assert len(resent_by_client) <= (CLIENTS if stop == signal.SIGKILL else 0), resent_by_client
    for a in answers:
        assert a.request_id == f"topo-{a.index}" and a.body["meta"]["request_id"] == a.request_id
        q, k, v, pattern = request_inputs(a.index)
        out = np.frombuffer(base64.b64decode(a.body["output"]["b64"]), dtype=np.float32)
        expected = attention(q, k, v, pattern).numpy().ravel()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=f"request {a.index}")

    # nginx logs a request just after answering it: give the last lines a moment to land.
    sent = {f"topo-{a.index}" for a in answers}
    deadline = time.monotonic() + 10
    while not sent <= (tried := served_by(access_log)).keys() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(tried) == sent, "every request is in nginx's access log"
    # Spread: before the kill, round robin gave each replica a fair share.
    first = [tried[f"topo-{a.index}"][-1] for a in answers[:BEFORE_KILL]]
    for addr in (victim_addr, survivor_addr):
        assert first.count(addr) >= BEFORE_KILL // 4, f"{addr} served {first.count(addr)} of {BEFORE_KILL}"
    # Failover: nginx sent requests to the dead replica, failed there, and resent them to the survivor.
    resent = [t for t in tried.values() if len(t) > 1]
    assert resent, "no request was resent: the kill was not observed under load"
    assert all(t[0] == victim_addr and t[-1] == survivor_addr for t in resent), resent
    # The survivor carries on: it finished every request sent after the kill, and is still ready.
    after = [tried[f"topo-{a.index}"][-1] for a in answers if a.started > killed_at]
    assert len(after) >= AFTER_KILL - CLIENTS and set(after) == {survivor_addr}
    assert survivor.poll() is None
    assert httpx.get(f"http://127.0.0.1:{survivor_port}/readyz", timeout=5, trust_env=False).status_code == 200

    # And when the last replica goes too, nginx answers for it: a JSON 503 with Retry-After.
    survivor.send_signal(stop)
    survivor.wait(timeout=30)
    r = httpx.get(f"{topology['url']}/healthz", headers={"X-Request-ID": "all-down"}, timeout=10, trust_env=False)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1" and r.headers["x-request-id"] == "all-down"
    error = r.json()["error"]
    assert error["status"] == 503 and "no replica" in error["message"]


def test_nginx_body_limit_is_the_service_limit():
    """Equal limits: nginx never refuses a body a replica would take, nor forwards one it would not."""
    from service.settings import Settings

    (limit_mib,) = re.findall(r"^\s*client_max_body_size (\d+)m;$", NGINX_CONF.read_text(), re.M)
    assert int(limit_mib) << 20 == Settings.model_fields["max_body_bytes"].default
    assert f"larger than the {limit_mib} MiB limit" in NGINX_CONF.read_text()
