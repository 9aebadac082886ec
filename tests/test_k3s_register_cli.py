"""``exo-nixos k3s register`` as a real process: EXO double for health, kube double for the API."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

from tests.exo_double.fixture import double_env, http_json, run_double
from tests.kube_double import KubeApiDouble, until

NS = "exo-system"
NAME = "exo-api-node-e2e"


def _register(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", "k3s", "register", "--config", str(config)],
        capture_output=True,
        text=True,
        env=double_env(),
        check=False,
        timeout=60,
    )


def test_register_follows_node_health_and_removes_itself_on_sigterm(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("good-token\n")

    with run_double("--force-master") as exo:

        async def main() -> tuple[int, str]:
            api = KubeApiDouble()
            await api.start()
            config = tmp_path / "config.json"
            config.write_text(
                json.dumps(
                    {
                        "schemaVersion": 1,
                        "apiPort": exo.port,
                        "gateway": {"enable": False},
                        "healthCheck": {"intervalSec": 0.1, "timeoutSec": 1, "failures": 1},
                        "k3s": {
                            "integration": True,
                            "tokenFile": str(token),
                            "apiServer": api.url,
                            "nodeName": "node-e2e",
                            "nodeAddress": "192.168.7.20",
                        },
                    }
                )
            )
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "exo_nixos",
                "k3s",
                "register",
                "--config",
                str(config),
                "--backoff-initial-sec",
                "0.05",
                "--backoff-max-sec",
                "0.2",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=double_env(),
            )
            try:
                await until(lambda: api.ready(NS, NAME) is True, "ready while the node is healthy")
                obj = api.get(NS, NAME)
                assert obj is not None
                assert obj["endpoints"][0]["addresses"] == ["192.168.7.20"]
                assert obj["ports"][0]["port"] == exo.port
                status, _ = await http_json(
                    "POST", f"{exo.url}/__double__/fault", {"mode": "error500", "paths": []}
                )
                assert status == 200
                await until(lambda: api.ready(NS, NAME) is False, "not ready while the node fails")
                await http_json("POST", f"{exo.url}/__double__/fault", {"mode": "ok"})
                await until(lambda: api.ready(NS, NAME) is True, "ready again")
                process.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(process.wait(), 20)
                assert process.stdout is not None
                output = (await process.stdout.read()).decode()
                assert api.get(NS, NAME) is None
                return code, output
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await api.stop()

        code, output = asyncio.run(main())
    assert code == 0, output
    assert "removed EndpointSlice exo-system/exo-api-node-e2e" in output
    assert "Traceback" not in output


def test_register_without_credentials_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"schemaVersion": 1, "k3s": {"integration": True}}))
    result = _register(config)
    assert result.returncode == 2
    assert result.stderr.startswith("exo-nixos: error: k3s: no credentials")
    assert "Traceback" not in result.stderr


def _k3s_config(tmp_path: Path, **k3s: object) -> Path:
    config = tmp_path / "config.json"
    doc = {
        "schemaVersion": 1,
        "gateway": {"enable": False},
        "k3s": {"integration": True, "nodeName": "n1", "nodeAddress": "127.0.0.1", **k3s},
    }
    config.write_text(json.dumps(doc))
    return config


def test_api_server_port_out_of_range_is_a_one_line_config_error(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("good-token\n")
    config = _k3s_config(tmp_path, tokenFile=str(token), apiServer="https://127.0.0.1:99999")
    result = _register(config)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"exo-nixos: error: {config}: k3s.apiServer: 'https://127.0.0.1:99999': "
        "the port must be 1 to 65535"
    ]


def test_kubeconfig_server_port_out_of_range_is_one_line(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "k3s.yaml"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: default\n"
        "clusters:\n- name: default\n  cluster:\n    server: https://127.0.0.1:99999\n"
        "contexts:\n- name: default\n  context:\n    cluster: default\n    user: default\n"
        "users:\n- name: default\n  user:\n    token: good-token\n"
    )
    result = _register(_k3s_config(tmp_path, kubeconfigFile=str(kubeconfig)))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"exo-nixos: error: k3s.kubeconfigFile: {kubeconfig} ")
    assert "https://127.0.0.1:99999" in line
    assert "port" in line


def test_an_unexpected_failure_of_the_registrar_is_one_line(tmp_path: Path, caplog) -> None:
    from types import SimpleNamespace

    from exo_nixos.config import load_config
    from exo_nixos.k3s.registrar import SliceSpec
    from exo_nixos.k3s.service import run_registrar

    class Broken:
        spec = SliceSpec(namespace=NS, service="exo-api", node_name="n1", port=52415)

        async def run(self, stop: asyncio.Event) -> bool:
            async def connect() -> None:
                raise OverflowError("connect_ex(): port must be 0-65535.")

            async with asyncio.TaskGroup() as group:
                group.create_task(connect())
            return True

        client = SimpleNamespace(close=lambda: asyncio.sleep(0))

    config = load_config(_k3s_config(tmp_path))
    assert run_registrar(config, Broken()) == 1  # type: ignore[arg-type]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "registration stopped: OverflowError: connect_ex(): port must be 0-65535."
    ]
    assert errors[0].exc_info is None
