"""Scaling without a reload: docker/nginx.conf, unchanged but for its listen port, follows the replica
set through DNS as it does under compose. A stand-in for docker's embedded DNS answers at its
address (127.0.0.11:53) with one A record per replica; replicas are `python -m service` on
127.0.0.2, .3, .4 port 8000, as containers would be on the compose network. Replicas added to the
answer get traffic, and one taken out gets none, with no reload of nginx.

Needs nginx >= 1.27.3 (`server ... resolve` and `resolver` in an upstream block), as the image has;
Debian 12's is 1.22, so on CI this skips. Point DEPLOY_TEST_NGINX at a newer one to run it (built
from nginx's source: `auto/configure --prefix=... && make install` takes under a minute).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pytest
from deploy_support import NGINX_CONF, main_conf, replica_log, start_replica, stop_all, wait_until_ready
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from service.loadtest import free_port

DNS_ADDRESS = "127.0.0.11"  # docker's embedded DNS, the `resolver` in docker/nginx.conf
REPLICA_ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
RESOLVE_EVERY_S = 5  # `valid=5s` in docker/nginx.conf


@pytest.fixture
def resolving_nginx() -> str:
    """An nginx with upstream `resolve`: DEPLOY_TEST_NGINX, or the one installed if it is new enough."""
    candidates = (os.environ.get("DEPLOY_TEST_NGINX"), shutil.which("nginx"), shutil.which("nginx", path="/usr/sbin"))
    for candidate in candidates:
        if candidate:
            banner = subprocess.run([candidate, "-v"], capture_output=True, text=True).stderr
            version = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", banner)
            if version and tuple(map(int, version.groups())) >= (1, 27, 3):
                return candidate
    pytest.skip("needs nginx >= 1.27.3 for upstream `resolve` (the image's); none found. Set DEPLOY_TEST_NGINX")


def bindable(address: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Free for a server to bind (SO_REUSEADDR, as uvicorn sets it: a past run's TIME_WAIT is no bar)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


@pytest.fixture
def docker_dns():
    """A DNS server at docker's address answering `service` with the replicas listed in .addresses."""
    if not bindable(DNS_ADDRESS, 53, socket.SOCK_DGRAM):
        pytest.skip(f"cannot bind {DNS_ADDRESS}:53 (needs root, and the port free)")

    class Replicas(BaseResolver):
        def __init__(self) -> None:
            self.addresses: list[str] = []

        def resolve(self, request, handler):
            reply = request.reply()
            question = request.q
            if str(question.qname).rstrip(".") == "service" and question.qtype == QTYPE.A:
                for address in list(self.addresses):
                    reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=1))
            else:
                reply.header.rcode = RCODE.NXDOMAIN
            return reply

    resolver = Replicas()
    server = DNSServer(resolver, address=DNS_ADDRESS, port=53, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    yield resolver
    server.stop()


def test_nginx_follows_replicas_added_and_removed_in_dns_without_reload(resolving_nginx, docker_dns, tmp_path):
    nginx = resolving_nginx
    if not all(bindable(address, 8000) for address in REPLICA_ADDRESSES):
        pytest.skip("port 8000 is taken on a loopback address the replicas need")
    procs: dict[str, subprocess.Popen] = {}

    def add_replica(address: str) -> None:
        procs[address] = start_replica(address, 8000, tmp_path)

    def tried_and_answered(count: int) -> tuple[set[str], set[str]]:
        """Sends `count` requests through nginx (each must succeed); from the access log, the
        replicas nginx tried and the ones that answered."""
        before = len(access_log.read_text().splitlines())
        for _ in range(count):
            r = httpx.get(f"{url}/healthz", timeout=10, trust_env=False)
            assert r.status_code == 200, r.text
        time.sleep(0.2)  # nginx logs just after answering
        tried, answered = set(), set()
        for line in access_log.read_text().splitlines()[before:]:
            upstreams = [u.rsplit(":", 1)[0] for u in re.search(r"upstream=(.*) upstream_status=", line)[1].split(", ")]
            tried.update(upstreams)
            answered.add(upstreams[-1])
        return tried, answered

    def wait_for_traffic_on(wanted: set[str]) -> None:
        """Until nginx tries exactly the replicas in DNS, within a few of its re-resolutions."""
        deadline = time.monotonic() + 4 * RESOLVE_EVERY_S
        while (seen := tried_and_answered(12)) != (wanted, wanted):
            assert time.monotonic() < deadline, f"nginx tries/answers from {seen}, not {wanted}, 20 s on"
            time.sleep(0.5)

    try:
        first, second, third = REPLICA_ADDRESSES
        for address in (first, second):
            add_replica(address)
        for address in (first, second):
            wait_until_ready(f"http://{address}:8000/readyz", procs[address], replica_log(address, 8000, tmp_path))
        docker_dns.addresses = [first, second]

        listen = free_port()
        conf_text, listens = re.subn(r"^([ \t]*)listen 8080;$", rf"\1listen 127.0.0.1:{listen};",
                                     NGINX_CONF.read_text(), flags=re.M)
        assert listens == 1
        site = tmp_path / "site.conf"
        site.write_text(conf_text)
        conf = tmp_path / "nginx.conf"
        conf.write_text(main_conf(tmp_path, site))
        access_log = tmp_path / "access.log"
        with access_log.open("w") as out:
            procs["nginx"] = subprocess.Popen([nginx, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{listen}"
        wait_until_ready(f"{url}/healthz", procs["nginx"], access_log)
        wait_for_traffic_on({first, second})

        # Scale up: a third replica appears in DNS; nginx starts sending to it, no reload.
        add_replica(third)
        wait_until_ready(f"http://{third}:8000/readyz", procs[third], replica_log(third, 8000, tmp_path))
        docker_dns.addresses = [first, second, third]
        wait_for_traffic_on({first, second, third})

        # Scale down: the second leaves DNS and stops; nginx stops sending to it, and nothing fails.
        docker_dns.addresses = [first, third]
        procs[second].send_signal(signal.SIGTERM)
        procs[second].wait(timeout=30)
        wait_for_traffic_on({first, third})
        assert procs["nginx"].poll() is None
    finally:
        stop_all(procs.values())
