"""Pre-flight checks: each one passing and failing, on trees built under a root prefix."""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import socket
from pathlib import Path
from typing import ClassVar

import pytest

from exo_nixos.cli import main
from exo_nixos.config import Accelerator, Config, parse_config
from exo_nixos.hardware import Inventory, detect
from exo_nixos.hosttree import Tree
from exo_nixos.preflight import (
    IN_USE,
    CheckResult,
    DirectorySpec,
    Status,
    check_devices,
    check_directory,
    check_disk,
    check_downloads,
    check_interface,
    check_kube_credentials,
    check_memory,
    check_ports,
    directory_specs,
    run_checks,
)
from tests.asuser import as_nobody, open_tmp
from tests.exo_double.fixture import free_port

ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def make_config(root: Path, **overrides: object) -> Config:
    document: dict[str, object] = {
        "schemaVersion": 1,
        "security": {
            "user": ME,
            "group": MY_GROUP,
            "dataDir": "/var/lib/exo",
            "cacheDir": "/var/cache/exo",
            "runtimeDir": "/run/exo",
            "configDir": "/etc/exo",
        },
    }
    document.update(overrides)
    return parse_config(document)


def build_host(root: Path) -> Tree:
    for d, mode in [
        ("var/lib/exo", 0o750),
        ("var/cache/exo", 0o750),
        ("run/exo", 0o750),
        ("etc/exo", 0o755),
    ]:
        (root / d).mkdir(parents=True)
        (root / d).chmod(mode)
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text("MemTotal:       65536000 kB\nMemFree: 1 kB\n")
    return Tree(root)


@pytest.fixture
def host(tmp_path: Path) -> Tree:
    h = build_host(tmp_path)
    (tmp_path / "proc/net").mkdir()
    (tmp_path / "proc/net/if_inet6").write_text("")
    return h


def test_ports_free(host: Tree) -> None:
    cfg = make_config(
        host.root,
        apiPort=free_port(socket.SOCK_STREAM),
        networking={
            "zenohPort": free_port(socket.SOCK_STREAM),
            "discoveryPort": free_port(socket.SOCK_DGRAM),
        },
    )
    assert check_ports(cfg).status is Status.OK


def test_port_in_use_fails_naming_the_option(host: Tree) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("0.0.0.0", 0))
        port = busy.getsockname()[1]
        cfg = make_config(
            host.root,
            apiPort=free_port(socket.SOCK_STREAM),
            networking={"discoveryPort": port, "zenohPort": free_port(socket.SOCK_STREAM)},
        )
        result = check_ports(cfg)
    assert result.status is Status.FAIL
    assert f"UDP port {port} (networking.discoveryPort) is in use" in result.reason


def test_tcp_listener_detected(host: Tree) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = check_ports(make_config(host.root, apiPort=port))
    assert result.status is Status.FAIL
    assert "(apiPort)" in result.reason


def _ipv6_only_socket(kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")
@pytest.mark.parametrize(
    ("kind", "option"),
    [(socket.SOCK_STREAM, "apiPort"), (socket.SOCK_DGRAM, "networking.discoveryPort")],
)
def test_port_held_only_on_ipv6_fails(host: Tree, kind: int, option: str) -> None:
    """EXO binds every address, IPv6 too: a port held on ``::`` alone (IPV6_V6ONLY), free on
    0.0.0.0, is in use all the same."""
    try:
        busy = _ipv6_only_socket(kind)
    except OSError as exc:
        pytest.skip(f"cannot bind an IPv6 socket here: {exc}")
    with busy:
        port = busy.getsockname()[1]
        with socket.socket(socket.AF_INET, kind) as v4:
            v4.bind(("0.0.0.0", port))  # the IPv4 side of the port is free
        if option == "apiPort":
            cfg = make_config(host.root, apiPort=port)
        else:
            cfg = make_config(
                host.root,
                apiPort=free_port(socket.SOCK_STREAM),
                networking={"discoveryPort": port, "zenohPort": free_port(socket.SOCK_STREAM)},
            )
        result = check_ports(cfg)
        # this node's own EXO may hold it: then it is not a problem
        assert check_ports(cfg, exo_running=True).status is Status.OK
    assert result.status is Status.FAIL
    proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
    assert result.reason == f"{proto} port {port} ({option}) is {IN_USE}"
    assert result.fix == f"stop what listens there (ss -lntup 'sport = :{port}') or change {option}"


def test_no_cluster_interface_is_ok(host: Tree) -> None:
    [result] = check_interface(make_config(host.root), host)
    assert result.status is Status.OK


NETWORK_FIXTURES = Path(__file__).parent / "fixtures" / "network"


@pytest.mark.parametrize(
    ("tree", "interface", "status", "words"),
    [
        ("bond-active-backup", "bond0", Status.OK, "bond0 is set as networking.bondInterface"),
        ("bond-active-backup-degraded", "bond0", Status.WARN, "bond0"),
        ("no-ipv6", "eth0", Status.FAIL, "IPv6 is disabled"),
        ("bond-active-backup", "bond9", Status.FAIL, "does not exist"),
    ],
)
def test_cluster_interface(tmp_path: Path, tree, interface, status, words) -> None:
    host = Tree(NETWORK_FIXTURES / tree)
    cfg = make_config(tmp_path, networking={"bondInterface": interface, "rdmaEnabled": False})
    results = check_interface(cfg, host)
    worst = max(results, key=lambda r: [Status.OK, Status.WARN, Status.FAIL].index(r.status))
    assert worst.status is status, results
    assert any(words in r.reason for r in results), results


def test_directories_ok(host: Tree) -> None:
    cfg = make_config(host.root)
    results = [check_directory(s, host, cfg) for s in directory_specs(cfg)]
    assert [r.status for r in results] == [Status.OK] * len(results), results
    assert "will be created by EXO" in results[-1].reason


def test_missing_data_dir_fails(host: Tree) -> None:
    cfg = make_config(host.root)
    (host.root / "var/lib/exo").rmdir()
    result = check_directory(directory_specs(cfg)[0], host, cfg)
    assert result.status is Status.FAIL
    assert "install -d" in result.fix


def test_world_readable_state_warns(host: Tree) -> None:
    cfg = make_config(host.root)
    (host.root / "var/lib/exo").chmod(0o755)
    result = check_directory(directory_specs(cfg)[0], host, cfg)
    assert result.status is Status.WARN
    assert "chmod o-rwx" in result.fix


def test_world_writable_fails(host: Tree) -> None:
    cfg = make_config(host.root, readOnlyModelDirs=["/srv/ro"])
    (host.root / "srv/ro").mkdir(parents=True)
    (host.root / "srv/ro").chmod(0o777)
    result = check_directory(directory_specs(cfg)[-1], host, cfg)
    assert result.status is Status.FAIL
    assert "world-writable" in result.reason


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown to another user")
def test_wrong_owner_fails(host: Tree) -> None:
    cfg = make_config(host.root)
    os.chown(host.root / "var/cache/exo", 65534, -1)
    result = check_directory(directory_specs(cfg)[1], host, cfg)
    assert result.status is Status.FAIL
    assert "chown" in result.fix


def test_not_a_directory(host: Tree) -> None:
    cfg = make_config(host.root, extraModelDirs=["/srv/file"])
    (host.root / "srv").mkdir()
    (host.root / "srv/file").write_text("")
    result = check_directory(directory_specs(cfg)[5], host, cfg)
    assert result.status is Status.FAIL
    assert "not a directory" in result.reason


def detected(host: Tree, cfg: Config) -> Inventory:
    return detect(host.root, use_nvml=False, models_dir=cfg.effective_models_dir)


def test_disk_reports_free_space(host: Tree) -> None:
    cfg = make_config(host.root)
    result = check_disk(cfg, detected(host, cfg).disk)
    assert result.status in {Status.OK, Status.WARN, Status.FAIL}
    assert "GiB free for models" in result.reason


def test_disk_fails_when_nearly_full(host: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tiny:
        f_bavail = 10
        f_blocks = 100
        f_frsize = 4096

    monkeypatch.setattr(os, "statvfs", lambda _: Tiny())
    cfg = make_config(host.root)
    result = check_disk(cfg, detected(host, cfg).disk)
    assert result.status is Status.FAIL


@pytest.mark.parametrize(
    ("limit", "status"),
    [
        (None, Status.OK),
        ("80%", Status.OK),
        ("48G", Status.OK),
        ("128G", Status.FAIL),
        ("80K", Status.FAIL),  # absurdly small: killed for memory at every start
        ("512M", Status.FAIL),
        ("1G", Status.OK),
        ("0.001%", Status.FAIL),
    ],
)
def test_memory_limit_against_physical(host: Tree, limit, status) -> None:
    cfg = make_config(host.root, hardware={"memoryLimit": limit})
    assert check_memory(cfg, detected(host, cfg).memory.total_bytes).status is status


def test_memory_limit_too_small_says_the_floor(host: Tree) -> None:
    cfg = make_config(host.root, hardware={"memoryLimit": "80K"})
    result = check_memory(cfg, detected(host, cfg).memory.total_bytes)
    assert "80K" in result.reason
    assert "at least 1 GiB" in result.fix


def test_memory_unreadable_warns(host: Tree) -> None:
    (host.root / "proc/meminfo").write_text("garbled")
    cfg = make_config(host.root)
    assert check_memory(cfg, detected(host, cfg).memory.total_bytes).status is Status.WARN


def test_cuda_devices(host: Tree) -> None:
    dev = host.root / "dev"
    dev.mkdir()
    assert check_devices(Accelerator.CUDA, host).status is Status.FAIL
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0"):
        (dev / name).write_text("")
    result = check_devices(Accelerator.CUDA, host)
    assert result.status is Status.OK
    assert "/dev/nvidia0" in result.reason
    assert check_devices(Accelerator.CPU, host).status is Status.OK


@pytest.mark.skipif(os.getuid() == 0, reason="root can access any device node")
def test_inaccessible_device_fails(host: Tree) -> None:
    dev = host.root / "dev/dri"
    dev.mkdir(parents=True)
    (host.root / "dev/kfd").write_text("")
    (dev / "renderD128").write_text("")
    (dev / "renderD128").chmod(0)
    result = check_devices(Accelerator.ROCM, host)
    assert result.status is Status.FAIL
    assert "DeviceAllow" in result.fix


def test_kube_credentials(host: Tree) -> None:
    assert check_kube_credentials(make_config(host.root), host).status is Status.OK
    cfg = make_config(host.root, k3s={"integration": True})
    assert check_kube_credentials(cfg, host).status is Status.WARN
    cfg = make_config(host.root, k3s={"integration": True, "kubeconfigFile": "/etc/k3s.yaml"})
    unreadable = check_kube_credentials(cfg, host)
    assert unreadable.status is Status.WARN
    assert "cannot be read" in unreadable.reason
    (host.root / "etc/k3s.yaml").write_text("")
    assert "is empty" in check_kube_credentials(cfg, host).reason
    (host.root / "etc/k3s.yaml").write_text("apiVersion: v1\nkind: Config\n")
    assert check_kube_credentials(cfg, host).status is Status.OK


def test_command_json_and_exit_code(host: Tree, tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "config.json"
    document = make_config(host.root).to_json()
    document["apiPort"] = free_port(socket.SOCK_STREAM)
    cfg_file.write_text(json.dumps(document))
    rc = main(["preflight", "--config", str(cfg_file), "--root", str(host.root), "--json"])
    results = json.loads(capsys.readouterr().out)
    assert {r["check"] for r in results} >= {"ports", "memory", "disk", "devices"}
    assert rc == (1 if any(r["status"] == "fail" for r in results) else 0)
    (host.root / "var/lib/exo").rmdir()
    assert main(["preflight", "--config", str(cfg_file), "--root", str(host.root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  directory /var/lib/exo" in out


def test_command_bad_config(tmp_path: Path, capsys) -> None:
    assert main(["preflight", "--config", str(tmp_path / "missing.json")]) == 2
    assert "no such config file" in capsys.readouterr().err


def _downloads(tree: str, tmp_path: Path, **overrides: object) -> list[CheckResult]:
    networking = {"bondInterface": "bond1", "rdmaEnabled": False}
    networking.update(overrides.pop("networking", {}))  # type: ignore[call-overload]
    cfg = make_config(tmp_path, networking=networking, **overrides)
    return check_downloads(cfg, Tree(NETWORK_FIXTURES / tree))


def test_default_route_outside_the_allowed_interfaces_warns_with_the_option(tmp_path) -> None:
    # a cluster bond plus a separate uplink (the default route is on wlp2s0)
    [result] = _downloads("bond-balance-alb", tmp_path)
    assert result.status is Status.WARN and result.check == "downloads"
    assert "default route is on wlp2s0" in result.reason
    assert "allows only lo, bond1" in result.reason
    assert 'downloadInterfaces = [ "wlp2s0" ]' in result.fix
    assert "services.exo.offline = true" in result.fix


@pytest.mark.parametrize(
    "overrides",
    [
        {"networking": {"downloadInterfaces": ["wlp2s0"]}},
        {"networking": {"restrictInterfaces": False}},
        {"networking": {"backupInterface": "wlp2s0"}},
        {"offline": True},
        {"networking": {"networkNamespace": "exo"}},
    ],
)
def test_default_route_reachable_or_downloads_off_is_quiet(tmp_path, overrides) -> None:
    assert _downloads("bond-balance-alb", tmp_path, **overrides) == []


def test_default_route_on_the_cluster_bond_is_quiet(tmp_path) -> None:
    assert _downloads("bond-active-backup", tmp_path, networking={"bondInterface": "bond0"}) == []


def test_run_checks_includes_the_download_route(tmp_path) -> None:
    host = Tree(NETWORK_FIXTURES / "bond-balance-alb")
    cfg = make_config(tmp_path, networking={"bondInterface": "bond1", "rdmaEnabled": False})
    inventory = detected(host, cfg)
    names = [r.check for r in run_checks(cfg, host, inventory, Accelerator.CPU, interface=False)]
    assert "downloads" in names


def _as_service_user(root: Path, user: str) -> Config:
    cfg = make_config(root)
    security = {**cfg.security.model_dump(by_alias=True), "user": user}
    return make_config(root, security=security)


@pytest.mark.skipif(os.getuid() != 0, reason="judging for another user is what root does")
@pytest.mark.parametrize(
    ("layout", "writable", "words"),
    [
        ({"srv": 0o755, "srv/models": 0o755}, True, "is not writable for nobody"),
        ({"srv": 0o700, "srv/models": 0o755}, False, "nobody cannot enter /srv"),
        ({"srv": 0o711, "srv/models": 0o700}, False, "is not readable for nobody"),
    ],
)
def test_directories_are_judged_for_the_service_user_not_the_caller(
    tmp_path: Path, layout: dict[str, int], writable: bool, words: str
) -> None:
    tmp_path.chmod(0o755)  # the tree's own root, as / is
    for name, mode in layout.items():
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name).chmod(mode)
    cfg = _as_service_user(tmp_path, "nobody")
    spec = DirectorySpec("modelsDir", "/srv/models", writable, False, False)
    result = check_directory(spec, Tree(tmp_path), cfg)
    assert result.status is Status.FAIL, result
    assert words in result.reason and "judged from permission bits for nobody" in result.reason


@pytest.mark.skipif(os.getuid() != 0, reason="judging for another user is what root does")
def test_a_directory_the_service_user_reaches_passes_for_it(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    (tmp_path / "srv/models").mkdir(parents=True)
    (tmp_path / "srv").chmod(0o755)
    os.chown(tmp_path / "srv/models", pwd.getpwnam("nobody").pw_uid, -1)
    cfg = _as_service_user(tmp_path, "nobody")
    spec = DirectorySpec("modelsDir", "/srv/models", True, False, False)
    assert check_directory(spec, Tree(tmp_path), cfg).status is Status.OK


def test_a_directory_behind_a_closed_parent_names_the_parent() -> None:
    """As the service user itself (ExecStartPre): the parent it cannot enter is named."""
    with open_tmp() as tmp:
        (tmp / "home/alice/models").mkdir(parents=True)
        (tmp / "home").chmod(0o755)
        (tmp / "home/alice").chmod(0o700)
        done = as_nobody(
            "-c",
            "from pathlib import Path\n"
            "from exo_nixos.config import parse_config\n"
            "from exo_nixos.hosttree import Tree\n"
            "from exo_nixos.preflight import DirectorySpec, check_directory\n"
            "cfg = parse_config({'schemaVersion': 1, 'security': {'user': 'nobody'}})\n"
            "spec = DirectorySpec('modelsDir', '/home/alice/models', True, False, False)\n"
            f"print(check_directory(spec, Tree(Path({str(tmp)!r})), cfg).reason)",
        )
    assert done.returncode == 0, done.stderr
    assert "nobody cannot enter /home/alice, so /home/alice/models" in done.stdout


def test_port_check_wording(host: Tree) -> None:
    api, zenoh = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    discovery = free_port(socket.SOCK_DGRAM)
    cfg = make_config(
        host.root, apiPort=api, networking={"zenohPort": zenoh, "discoveryPort": discovery}
    )
    listed = f"TCP {api}, TCP {zenoh}, UDP {discovery}"
    assert check_ports(cfg) == CheckResult("ports", Status.OK, f"{listed} are free")
    assert check_ports(cfg, exo_running=True) == CheckResult(
        "ports", Status.OK, f"{listed}: free or held by this node's running EXO"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("0.0.0.0", zenoh))
        busy.listen()
        result = check_ports(cfg)
    assert result.check == "ports" and result.status is Status.FAIL
    assert result.reason == f"TCP port {zenoh} (networking.zenohPort) is {IN_USE}"
    assert result.to_json() == {
        "check": "ports",
        "status": "fail",
        "reason": result.reason,
        "fix": result.fix,
    }


class _FakeSocket:
    """A socket whose bind fails as ``binds[family]`` says (None: it binds)."""

    made: ClassVar[list[_FakeSocket]] = []

    def __init__(self, binds: dict[int, OSError | None], family: int, kind: int) -> None:
        self.family, self.kind, self.binds = family, kind, binds
        self.options: list[tuple[int, int, int]] = []
        _FakeSocket.made.append(self)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))

    def bind(self, address: tuple[str, int]) -> None:
        error = self.binds[self.family]
        if error is not None:
            raise error

    def __enter__(self) -> _FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _port_problem(monkeypatch, kind: int, **binds: OSError | None) -> str | None:
    from exo_nixos.preflight import _port_in_use

    families: dict[str, int] = {"v6": socket.AF_INET6, "v4": socket.AF_INET}
    table = {families[k]: v for k, v in binds.items()}

    def make(family: int, kind: int) -> _FakeSocket:
        if family not in table:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return _FakeSocket(table, family, kind)

    _FakeSocket.made = []
    monkeypatch.setattr(socket, "socket", make)
    return _port_in_use(kind, 52415)


def test_port_check_errors_one_by_one(monkeypatch) -> None:
    tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    # IPv6 absent (no socket, or no address): the IPv4 answer decides
    assert _port_problem(monkeypatch, tcp, v4=in_use) == IN_USE
    assert _port_problem(monkeypatch, tcp, v6=OSError(errno.EADDRNOTAVAIL, "x"), v4=in_use) == (
        IN_USE
    )
    assert _port_problem(monkeypatch, tcp, v6=None, v4=None) is None
    assert _port_problem(monkeypatch, tcp, v6=OSError(errno.EACCES, "x"), v4=None) == (
        "not allowed for this user (privileged port)"
    )
    assert (
        _port_problem(monkeypatch, tcp, v6=OSError(errno.EPERM, "Operation not permitted"), v4=None)
        == "Operation not permitted"
    )
    assert (
        _port_problem(monkeypatch, tcp, v6=OSError(errno.EPERM), v4=None) == "1"
    )  # no strerror: str() of the error
    # options: IPv6 only on the IPv6 socket; SO_REUSEADDR for TCP (as EXO's listener), not UDP
    _port_problem(monkeypatch, tcp, v6=None, v4=None)
    assert [s.options for s in _FakeSocket.made] == [
        [
            (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
            (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1),
        ],
        [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)],
    ]
    _port_problem(monkeypatch, udp, v6=None, v4=None)
    assert [s.options for s in _FakeSocket.made] == [
        [(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)],
        [],
    ]


def test_a_damaged_model_cache_warns(tmp_path: Path, host: Tree) -> None:
    from exo_nixos.preflight import check_model_cache
    from tests.models_cache import make_model, truncate

    cfg = make_config(tmp_path)
    assert check_model_cache(cfg, host) == []
    model = make_model(tmp_path / "var/lib/exo/models", shards=1)
    assert check_model_cache(cfg, host) == []
    truncate(model / "model-00001-of-00001.safetensors")
    [result] = check_model_cache(cfg, host)
    assert result.status is Status.WARN
    assert "truncated" in result.reason
    assert "models verify --repair" in result.fix
