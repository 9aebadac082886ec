"""Memory pressure (PSI), the OOM back-off, ``status`` on this host, and the exporter, against
fixture cgroup trees, the EXO test double and the real commands."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exo_nixos.cli import main
from exo_nixos.config import Accelerator, parse_config
from exo_nixos.exoapi import run_coroutine
from exo_nixos.monitoring.facts import SupervisorFacts, write_facts
from exo_nixos.monitoring.psi import (
    DEGRADED_SOME_AVG60,
    parse_pressure,
    read_cgroup_memory,
    unit_cgroup,
)
from exo_nixos.supervisor import oom
from exo_nixos.supervisor.environment import Selection, build_launch
from tests.exo_double.fixture import REPO_ROOT, double_env, free_port, run_double
from tests.gateway_helpers import KEY_A, gateway_config, run_gateway, write_keys
from tests.test_supervisor_process import supervise, wait_status  # noqa: F401

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
OTHER = "mlx-community/Qwen3-0.6B-4bit"
EXO_NIXOS = (sys.executable, "-m", "exo_nixos")
DASHBOARD = REPO_ROOT / "docs" / "grafana-dashboard.json"


def pressure_text(some60: float, full60: float = 0.0) -> str:
    return (
        f"some avg10={some60 + 1:.2f} avg60={some60:.2f} avg300=1.00 total=2500000\n"
        f"full avg10=0.00 avg60={full60:.2f} avg300=0.00 total=1000000\n"
    )


def cgroup_tree(root: Path, unit: str, some60: float, *, high: str = "max") -> Path:
    """A fixture of ``/sys/fs/cgroup`` with the node unit's memory files."""
    group = unit_cgroup(unit, root)
    group.mkdir(parents=True)
    (group / "memory.pressure").write_text(pressure_text(some60))
    (group / "memory.current").write_text(f"{3 << 30}\n")
    (group / "memory.high").write_text(f"{high}\n")
    (group / "memory.max").write_text(f"{8 << 30}\n")
    (group / "memory.events").write_text("low 0\nhigh 12\nmax 3\noom 1\noom_kill 1\n")
    return group


# -- PSI ---------------------------------------------------------------------------------------


def test_psi_parsed_and_sustained_pressure_is_degraded(tmp_path):
    calm = read_cgroup_memory(cgroup_tree(tmp_path / "a", "exo-worker", 2.5))
    assert calm.problem is None
    assert calm.pressure is not None
    assert calm.pressure.some.avg60 == 2.5
    assert calm.pressure.some.total_us == 2500000
    assert calm.pressure.degraded is None
    assert (calm.current_bytes, calm.high_bytes, calm.max_bytes) == (3 << 30, None, 8 << 30)
    assert calm.oom_kills == 1
    busy = read_cgroup_memory(cgroup_tree(tmp_path / "b", "exo-worker", DEGRADED_SOME_AVG60))
    assert busy.pressure is not None
    assert busy.pressure.degraded is not None
    assert busy.pressure.degraded.startswith("memory pressure: tasks stalled on memory 10.0%")


def test_psi_without_full_line_and_garbage():
    assert parse_pressure("some avg10=1.00 avg60=2.00 avg300=3.00 total=4\n").full.total_us == 0
    with pytest.raises(ValueError, match="unexpected PSI line"):
        parse_pressure("some avg10=x avg60=2.00 avg300=3.00 total=4\n")
    with pytest.raises(ValueError, match="no 'some' line"):
        parse_pressure("")


def test_cgroup_missing_or_closed_says_why(tmp_path):
    missing = read_cgroup_memory(unit_cgroup("exo-master", tmp_path))
    assert missing.pressure is None
    assert missing.problem is not None
    assert "is exo-master.service running" in missing.problem


# -- the OOM back-off --------------------------------------------------------------------------


def test_oom_kills_lower_the_offer_in_bounded_steps_and_time_gives_them_back(tmp_path):
    path = tmp_path / "runs.json"
    assert oom.offer(oom.load(path), 10000, 64000, 0.0) == oom.Offer(10000)
    now = 1_000_000.0
    offers = []
    for kill in range(6):
        record = oom.record_stop(path, "oom-kill", now + kill)
        offers.append(oom.offer(record, 10000, 64000, now + kill).memory_mb)
    assert offers == [9000, 8000, 7000, 6000, 6000, 6000]  # MAX_STEPS: never below 60%
    record = oom.load(path)
    assert record.oom_kills == 6
    later = now + 5 + oom.RECOVER_AFTER_S
    result = oom.offer(record, 10000, 64000, later)
    assert result.memory_mb == 7000
    assert result.reason is not None
    assert "offering it 7000 MiB instead of 10000 MiB" in result.reason
    assert oom.offer(record, 10000, 64000, now + 5 + 4 * oom.RECOVER_AFTER_S).reason is None
    # other endings add no step; an unlimited EXO is offered its share of all memory
    record = oom.record_stop(path, "exit-code", later)
    assert (record.steps, record.last_result) == (4, "exit-code")
    assert oom.offer(record, None, 64000, later).memory_mb == 44800


def test_a_garbled_record_is_a_fresh_one(tmp_path):
    path = tmp_path / "runs.json"
    path.write_text('{"starts": -1}')
    assert oom.load(path) == oom.RunRecord()
    assert oom.record_start(path).starts == 1


def test_record_stop_reads_systemds_service_result(tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"schemaVersion": 1, "security": {"dataDir": str(tmp_path)}}))
    monkeypatch.setenv("SERVICE_RESULT", "oom-kill")
    assert main(["record-stop", "--config", str(config)]) == 0
    assert "EXO was killed for lack of memory (1 kill(s) recorded)" in capsys.readouterr().err
    record = oom.load(oom.record_path(tmp_path))
    assert (record.oom_kills, record.steps) == (1, 1)
    assert main(["record-stop", "--config", str(config), "--result", "success"]) == 0
    assert oom.load(oom.record_path(tmp_path)).steps == 1


def test_the_next_start_offers_less_memory_after_an_oom_kill(tmp_path, caplog):
    """The one call site: build_launch lowers the hardware decision's OVERRIDE_MEMORY_MB."""
    config = parse_config({"schemaVersion": 1, "security": {"dataDir": str(tmp_path)}})
    selection = Selection(
        accelerator=Accelerator.CPU,
        executable="/bin/true",
        env={"OVERRIDE_MEMORY_MB": "20000"},
    )
    assert build_launch(config, "worker", base_env={}, selection=selection).memory_mb == 20000
    oom.record_stop(oom.record_path(tmp_path), "oom-kill")
    with caplog.at_level("WARNING"):
        launch = build_launch(config, "worker", base_env={}, selection=selection)
    assert launch.memory_mb == 18000
    assert launch.env["OVERRIDE_MEMORY_MB"] == "18000"
    assert "offering it 18000 MiB instead of 20000 MiB" in caplog.text


# -- status on this host -----------------------------------------------------------------------


def local_config(tmp: Path, api_port: int, **extra: Any) -> Path:
    runtime = tmp / "run"
    runtime.mkdir(exist_ok=True)
    doc = {
        "schemaVersion": 1,
        "apiPort": api_port,
        "security": {"runtimeDir": str(runtime), "dataDir": str(tmp / "data")},
        **extra,
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(doc))
    return path


def test_status_shows_this_hosts_pressure_accelerator_and_offer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    cgroot = tmp_path / "cg"
    cgroup_tree(cgroot, "exo-worker", 25.0)
    with run_double("--instance", MODEL) as double:
        config = local_config(tmp_path, double.port)
        facts = SupervisorFacts(
            "worker", "cpu", fallback="cuda unusable (no GPU); running on CPU", memory_offer_mb=900
        )
        write_facts(tmp_path / "run", facts)
        argv = ["status", "--config", str(config), "--cgroup-root", str(cgroot)]
        code = main(argv)
        out = capsys.readouterr().out
        assert main([*argv, "--json"]) == 1
        doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert "memory pressure 26.0% / 25.0% (10 s / 60 s)" in out
    assert "this host runs EXO on cpu (FALLBACK: cuda unusable (no GPU); running on CPU)" in out
    assert "offers EXO 900 MiB" in out
    assert "problem: memory pressure: tasks stalled on memory 25.0%" in out
    assert doc["memoryPressure"]["someAvg60"] == 25.0
    assert doc["memoryPressure"]["maxBytes"] == 8 << 30
    assert doc["supervisor"]["accelerator"] == "cpu"
    assert doc["problems"][-1].startswith("memory pressure:")


def test_status_says_what_it_cannot_see_here(tmp_path, capsys):
    with run_double() as double:
        config = local_config(tmp_path, double.port)
        argv = ["status", "--config", str(config), "--cgroup-root", str(tmp_path / "none")]
        code = main([*argv, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0  # not seeing the cgroup is a note, not a problem
    notes = doc["notes"]
    assert any(n.startswith("accelerator and memory offer unknown: ") for n in notes)
    assert any("memory pressure unknown: " in n and "exo-worker.service" in n for n in notes)


def test_status_through_the_gateway_with_an_api_key_file(tmp_path, capsys):
    keys = write_keys(tmp_path / "keys", f"# keys\nalice:{KEY_A}\n")
    client_key = write_keys(tmp_path / "client-key", f"{KEY_A}\n")
    with run_double("--instance", MODEL, node_id="ab12") as double:
        config = gateway_config(
            port=free_port(), keys_file=keys, static_backends=[double.url], interval=0.2
        )
        with run_gateway(config) as gateway:
            deadline = time.monotonic() + 15
            while main(["status", "--url", gateway.url, "--api-key-file", str(keys)]) != 0:
                assert time.monotonic() < deadline, gateway.log_text()
                time.sleep(0.2)
            capsys.readouterr()
            without = main(["status", "--url", gateway.url, "--json"])
            refused = json.loads(capsys.readouterr().out)
            code = main(
                ["status", "--url", gateway.url, "--json", "--api-key-file", str(client_key)]
            )
            doc = json.loads(capsys.readouterr().out)
    assert without == 2
    assert refused["problems"] == ["HTTP 401 from /node_id"]
    assert code == 0
    assert doc["nodeId"] == "ab12"
    assert doc["cluster"]["instances"][0]["modelId"] == MODEL


def test_api_key_file_problems_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    assert main(["status", "--api-key-file", str(empty)]) == 2
    assert "no key in it" in capsys.readouterr().err
    assert main(["status", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_status_watch_refreshes_until_interrupted():
    with run_double() as double:
        process = subprocess.Popen(
            [*EXO_NIXOS, "status", "--url", double.url, "--json", "--watch", "0.2"],
            stdout=subprocess.PIPE,
            text=True,
            env=double_env(),
        )
        assert process.stdout is not None
        lines = [process.stdout.readline(), process.stdout.readline()]
        process.send_signal(signal.SIGINT)
        code = process.wait(10)
    assert [json.loads(line)["status"] for line in lines] == ["healthy", "healthy"]
    assert code == 0


# -- the exporter ------------------------------------------------------------------------------


@contextlib.contextmanager
def run_exporter(config: Path, cgroot: Path) -> Iterator[str]:
    port = json.loads(config.read_text())["exporter"]["port"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [*EXO_NIXOS, "exporter", "--config", str(config), "--cgroup-root", str(cgroot)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=double_env(),
        )
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    get(url)
                    break
                except aiohttp.ClientError:
                    assert process.poll() is None and time.monotonic() < deadline, _read(log)
                    time.sleep(0.1)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0, _read(log)


def _read(log: Any) -> str:
    log.seek(0)
    return str(log.read().decode(errors="replace"))


def get(url: str) -> tuple[str, str]:
    async def fetch() -> tuple[str, str]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            return response.headers["Content-Type"], await response.text()

    return run_coroutine(fetch())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    cgroot = tmp_path / "cg"
    cgroup_tree(cgroot, "exo-worker", 12.5, high=str(7 << 30))
    args = ["--instance", MODEL, "--download", f"{OTHER}=40", "--peer", "cc33=127.0.0.3"]
    with run_double(*args, "--bind", "127.0.0.1", node_id="aa11") as double:
        config = local_config(tmp_path, double.port, exporter={"enable": True, "port": free_port()})
        write_facts(tmp_path / "run", SupervisorFacts("worker", "cuda", memory_offer_mb=1024))
        oom.record_start(oom.record_path(tmp_path / "data"))
        oom.record_stop(oom.record_path(tmp_path / "data"), "oom-kill")
        with run_exporter(config, cgroot) as url:
            yield url, double


def test_exporter_serves_the_cluster_in_prometheus_format(exporter):
    url, _ = exporter
    content_type, text = get(url)
    assert content_type.startswith("text/plain; version=")
    s = samples(text)
    assert s[("exo_up", ())] == 1.0
    assert s[("exo_health_status", (("status", "degraded"),))] == 1.0  # cc33 unreachable
    assert s[("exo_cluster_nodes", ())] == 2.0
    assert s[("exo_node_up", (("node", "double-aa11"),))] == 1.0
    assert s[("exo_node_up", (("node", "double-cc33"),))] == 0.0
    assert s[("exo_node_memory_total_bytes", (("node", "double-cc33"),))] == 64 << 30
    info = [k for k in s if k[0] == "exo_node_info" and ("node", "double-aa11") in k[1]]
    assert info and ("node_id", "aa11") in info[0][1]
    assert (
        s[("exo_instances", (("model", MODEL), ("sharding", "Pipeline"), ("state", "Ready")))] == 1
    )
    assert s[("exo_runners", (("state", "Ready"),))] == 2.0
    progress = s[("exo_download_progress_ratio", (("model", OTHER), ("node", "double-aa11")))]
    assert progress == pytest.approx(0.4, abs=0.001)
    assert s[("exo_node_starts_total", ())] == 1.0
    assert s[("exo_node_oom_kills_total", ())] == 1.0
    assert s[("exo_memory_backoff_steps", ())] == 1.0
    assert s[("exo_memory_offer_bytes", ())] == 1024 << 20
    accel = [k for k in s if k[0] == "exo_accelerator_info"]
    assert accel and ("accelerator", "cuda") in accel[0][1] and ("fallback", "0") in accel[0][1]
    ratio = s[("exo_node_unit_memory_pressure_ratio", (("kind", "some"), ("window", "60s")))]
    assert ratio == pytest.approx(0.125)
    assert s[("exo_node_unit_memory_stalled_seconds_total", (("kind", "some"),))] == 2.5
    assert s[("exo_node_unit_memory_pressure_degraded", ())] == 1.0
    assert s[("exo_node_unit_memory_high_bytes", ())] == 7 << 30
    assert s[("exo_probe_duration_seconds", ())] > 0


def test_exporter_reports_a_node_that_is_down(exporter):
    url, double = exporter
    double.set_fault("error500")
    s = samples(get(url)[1])
    assert s[("exo_up", ())] == 0.0
    assert s[("exo_health_status", (("status", "down"),))] == 1.0
    assert s[("exo_node_starts_total", ())] == 1.0  # what the host knows stays visible


_METRIC = re.compile(r"\b(exo_[a-z0-9_]+)")


def dashboard_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in doc["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    exprs += [v["query"] for v in doc["templating"]["list"] if v.get("type") == "query"]
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def test_every_dashboard_query_names_a_metric_the_exporter_serves(exporter):
    url, _ = exporter
    served = {name for name, _ in samples(get(url)[1])}
    missing = sorted(dashboard_metrics() - served)
    assert not missing, f"the dashboard queries metrics the exporter does not serve: {missing}"


def test_exporter_refuses_a_port_in_use(tmp_path):
    port = free_port()
    config = local_config(tmp_path, 1, exporter={"enable": True, "port": port})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        done = subprocess.run(
            [sys.executable, "-m", "exo_nixos", "exporter", "--config", str(config)],
            capture_output=True,
            text=True,
            env=double_env(),
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert f"cannot listen on http://127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# -- the supervisor: facts, run record, pressure in STATUS ------------------------------------


def test_supervisor_records_its_start_and_shows_memory_pressure_in_status(supervise, tmp_path):  # noqa: F811
    """``exo-nixos run`` counts the start, leaves its facts for status and the exporter, and
    says in STATUS when its own cgroup (read below --host-root) is under memory pressure."""
    own = Path("/proc/self/cgroup").read_text().splitlines()
    path = next(line.removeprefix("0::/") for line in own if line.startswith("0::/"))
    host = tmp_path / "host"
    group = host / "sys/fs/cgroup" / path
    group.mkdir(parents=True)
    (group / "memory.pressure").write_text(pressure_text(40.0))
    run = supervise(host_root=host)
    status = wait_status(run.listener, "; degraded: memory pressure: tasks stalled on memory 40.0%")
    assert status.startswith("worker; ")
    security = run.config["security"]
    facts = json.loads((Path(security["runtimeDir"]) / "supervisor.json").read_text())
    assert (facts["role"], facts["accelerator"], facts["fallback"]) == ("worker", "cpu", None)
    assert oom.load(oom.record_path(security["dataDir"])).starts == 1
