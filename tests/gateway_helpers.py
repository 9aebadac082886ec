"""Run ``exo-nixos gateway`` as a real subprocess for tests and the benchmark."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.exo_double.fixture import REPO_ROOT, double_env, free_port

KEY_A = "alice-0123456789abcdef0123456789abcdef"
KEY_B = "bob-fedcba9876543210fedcba9876543210"


def write_keys(path: Path, text: str) -> Path:
    """Write a key file as the gateway accepts it: no access for other users."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def gateway_config(
    *,
    port: int,
    api_port: int = 1,
    keys_file: Path | None = None,
    local_backend: bool = False,
    static_backends: list[str] | None = None,
    public_paths: list[str] | None = None,
    max_body_bytes: int | None = None,
    tls: tuple[Path, Path] | None = None,
    interval: float = 0.5,
    log_level: str = "info",
    key_policies: dict[str, Any] | None = None,
    policy_file: Path | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    gateway: dict[str, Any] = {
        "listenAddress": "127.0.0.1",
        "port": port,
        "localBackend": local_backend,
        "staticBackends": static_backends or [],
        "workers": workers,
    }
    if keys_file is not None:
        gateway["apiKeysFile"] = str(keys_file)
    if public_paths is not None:
        gateway["publicPaths"] = public_paths
    if max_body_bytes is not None:
        gateway["maxBodyBytes"] = max_body_bytes
    if key_policies is not None:
        gateway["keyPolicies"] = key_policies
    if policy_file is not None:
        gateway["policyFile"] = str(policy_file)
    if tls is not None:
        gateway["tlsCertificateFile"] = str(tls[0])
        gateway["tlsKeyFile"] = str(tls[1])
    return {
        "schemaVersion": 1,
        "apiPort": api_port,
        "logLevel": log_level,
        "gateway": gateway,
        "healthCheck": {"intervalSec": interval, "timeoutSec": 1.0, "failures": 2},
    }


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Until ``text`` is in the gateway's log; fails with the log after ``timeout``."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def run_gateway(
    config: Mapping[str, Any],
    *,
    wait: bool = True,
    timeout: float = 20.0,
    max_files: int | None = None,
) -> Iterator[GatewayProcess]:
    """Start ``python -m exo_nixos gateway --config FILE``; stop it on exit. ``max_files``:
    its limit of open file descriptors (RLIMIT_NOFILE)."""

    with tempfile.TemporaryDirectory(prefix="exo-gateway-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config))
        log_path = Path(tmp) / "stderr.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "exo_nixos", "gateway", "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=double_env(),
                cwd=REPO_ROOT,
            )
        if max_files is not None:
            resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (max_files, max_files))
        tls = bool(config["gateway"].get("tlsCertificateFile"))
        gateway = GatewayProcess(process, int(config["gateway"]["port"]), log_path)
        gateway.scheme = "https" if tls else "http"
        try:
            if wait:
                deadline = time.monotonic() + timeout
                while not _listening(gateway.port):
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"gateway exited with {process.returncode}:\n{gateway.log_text()}"
                        )
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"gateway did not listen in {timeout}s")
                    time.sleep(0.05)
            yield gateway
        finally:
            gateway.stop()


__all__ = [
    "KEY_A",
    "KEY_B",
    "GatewayProcess",
    "free_port",
    "gateway_config",
    "run_gateway",
    "write_keys",
]
