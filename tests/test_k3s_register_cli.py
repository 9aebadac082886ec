"""``exo-nixos k3s register`` as a real process: EXO double for health, kube double for the API."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from tests.exo_double.fixture import double_env, http_json, run_double
from tests.kube_double import KubeApiDouble, until

NS = "exo-system"
NAME = "exo-api-node-e2e"


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
    import subprocess

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"schemaVersion": 1, "k3s": {"integration": True}}))
    result = subprocess.run(
        [sys.executable, "-m", "exo_nixos", "k3s", "register", "--config", str(config)],
        capture_output=True,
        text=True,
        env=double_env(),
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("exo-nixos: error: k3s: no credentials")
    assert "Traceback" not in result.stderr
