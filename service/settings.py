"""Service settings, read from `ATTN_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.batcher import ThreadBudget
from engine.patterns import error_reason


class Settings(BaseSettings):
    """Each setting is a flag or its ATTN_* environment variable (the flag wins); the README's settings table has them all."""

    model_config = SettingsConfigDict(env_prefix="ATTN_", frozen=True, allow_inf_nan=False)

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: int = Field(32, ge=1, description="requests per engine call; 1 turns batching off")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=10_000, description="how long a batch waits to fill")
    queue_size: int = Field(256, ge=1, description="requests waiting for the engine before 429")
    max_tokens_per_request: int = Field(1 << 20, ge=1, description="B * Lk (key positions over the batch)")
    max_tensor_elements: int = Field(1 << 27, ge=1, description="elements in any of q, k, v or the output")
    max_heads: int = Field(1024, ge=1, description="query heads H of one request")
    max_pairs_per_request: int | None = Field(
        None, ge=1, description="attended (query, key) pairs over the batch and heads, the work one request asks "
        "for; unset: 2^35 on the CPU (~50 s of dense attention on 2 cores), 2^42 on CUDA",
    )
    max_body_bytes: int = Field(256 << 20, ge=1)
    body_timeout_s: float = Field(60.0, gt=0, description="a request's head must arrive within this of the "
                                  "connection's opening or its first byte, its whole body within this of its start; else 408")
    max_header_bytes: int = Field(16384, ge=1024, description="request line and headers in all; larger: 431")
    max_connections: int | None = Field(None, ge=1, description="open connections (and requests); beyond: 503")
    request_timeout_ms: float = Field(30_000, gt=0, description="default deadline; also caps timeout_ms")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 429 and 503")
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="comma-separated Bearer keys; empty: no authentication"
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="comma-separated origins browsers may call from; empty: no CORS headers at all"
    )
    drain_s: float = Field(1.0, ge=0, description="after SIGTERM: answer new requests 503 this long, then stop listening")
    shutdown_timeout_s: int = Field(8, ge=1, description="after draining: the most time in-flight requests get")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads of every engine call; 0: every usable core (the affinity, "
        "capped by a container's CPU limit) for a large call with nothing queued, one fewer otherwise (kept "
        "for the event loop)",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            items = tuple(key.strip() for key in value.split(",") if key.strip())
            if value.strip() and not items:  # ",," meant keys: not a silent "no authentication"
                raise ValueError(f"{value!r} lists nothing; leave it unset for none")
            return items
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_as_browsers_send_them(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        """An origin is scheme://host[:port], no path: a browser's Origin header never matches
        'http://a.com/'; '*' stands alone, since beside others it would silently allow every origin."""
        if "*" in origins and len(origins) > 1:
            raise ValueError("'*' allows every origin: give it alone or not at all")
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://(\[[0-9a-fA-F:.]+\]|[^/\s:\[\]]+)(:[0-9]{1,5})?", origin):
                raise ValueError(f"{origin!r} is not an origin such as https://app.example.com or http://localhost:3000")
        return origins

    @cached_property
    def thread_budget(self) -> ThreadBudget:
        """Threads torch computes with, per engine call. By default one core is left to the event
        loop (HTTP, JSON, base64) whenever it may be busy: when both compete for every core, each
        engine call waits on its thread team's barrier."""
        if self.torch_threads:
            return ThreadBudget(self.torch_threads, reserved=0)
        return ThreadBudget(usable_cores())

    @cached_property
    def pairs_limit(self) -> int:
        """`max_pairs_per_request`, or the device's default: one request may not hold the engine for long."""
        return self.max_pairs_per_request or (1 << 42 if self.torch_device.type == "cuda" else 1 << 35)

    @cached_property
    def torch_device(self) -> torch.device:
        """The device the engine runs on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("ATTN_DEVICE=cuda but torch sees no CUDA device")
        return torch.device(self.device)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup's CPU quota. A container
    sees every core of its host; its CPU limit shows only as the quota (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), and threads beyond it only wait on each other."""
    cores = len(os.sched_getaffinity(0))
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cpu_quota(cgroup: Path) -> float | None:
    """The quota in CPUs, or None when there is none (or no cgroup file to read it from)."""
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:  # v1
            limit = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # -1: none
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if limit in ("max", "-1") or not limit.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(limit) / int(period)


def settings_problems(error: ValidationError) -> list[str]:
    """One line per invalid setting, named as its flag and its environment variable."""
    problems = []
    for e in error.errors():
        name = "_".join(map(str, e["loc"]))
        problems.append(f"--{name.replace('_', '-')} / ATTN_{name.upper()}={e.get('input')!r}: {error_reason(e)}")
    return problems


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """ATTN_* variables no setting reads (a typo leaves its setting at the default), less the
    others' own (`NOT_SETTINGS`), which may be in the shell that starts the service."""
    known = {f"ATTN_{name.upper()}" for name in Settings.model_fields} | NOT_SETTINGS
    return sorted(name for name in environ if name.startswith("ATTN_") and name not in known)


# ATTN_* variables read by docker/compose*.yaml for itself, by the test suite (`make fuzz`), and by
# the engine (where it keeps its built CPU span kernel: engine/kernels/span_kernel.py).
NOT_SETTINGS = frozenset({"ATTN_REPLICAS", "ATTN_CPUS", "ATTN_MEMORY", "ATTN_PUBLISH_PORT", "ATTN_IMAGE",
                          "ATTN_GPUS_PER_REPLICA", "ATTN_FUZZ_EXAMPLES", "ATTN_KERNEL_CACHE"})
