"""Pre-flight checks run before EXO starts (the node unit's ExecStartPre).

Each check returns a result with a status (ok, warn, fail), a one-line reason and, when not ok,
a fix. Everything read from the host (sysfs, procfs, /dev, the directories) is looked up under a
root prefix, so a captured tree can be checked as well as the live system.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path

from exo_nixos.config import Accelerator, Config, MemoryLimit
from exo_nixos.fsutil import os_reason, read_bounded
from exo_nixos.hardware.model import Disk, Inventory
from exo_nixos.hosttree import Tree
from exo_nixos.k3s.credentials import credential_path
from exo_nixos.units import GIB, gib

DISK_FAIL_BYTES = 2 * GIB
DISK_WARN_BYTES = 50 * GIB


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    reason: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        data = asdict(self)
        data["status"] = str(self.status)
        return data


def _ok(check: str, reason: str) -> CheckResult:
    return CheckResult(check, Status.OK, reason)


def _warn(check: str, reason: str, fix: str) -> CheckResult:
    return CheckResult(check, Status.WARN, reason, fix)


def _fail(check: str, reason: str, fix: str) -> CheckResult:
    return CheckResult(check, Status.FAIL, reason, fix)


# ---------------------------------------------------------------- ports


IN_USE = "in use by another process"


def _port_in_use(kind: int, port: int) -> str | None:
    """Why ``port`` cannot be bound the way EXO binds it (all addresses), or None when free."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, kind)
        except OSError:
            continue  # address family unavailable on this host
        with sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return IN_USE
                if exc.errno == errno.EACCES:
                    return "not allowed for this user (privileged port)"
                if exc.errno == errno.EADDRNOTAVAIL:
                    continue
                return os_reason(exc)
    return None


def check_ports(config: Config, *, exo_running: bool = False) -> CheckResult:
    """EXO's ports can be bound; with ``exo_running`` (this node's EXO answers on its API
    port, as ``doctor`` sees on a healthy node) a port in use is EXO's own."""
    wanted = [
        ("TCP", socket.SOCK_STREAM, config.api_port, "apiPort"),
        ("TCP", socket.SOCK_STREAM, config.networking.zenoh_port, "networking.zenohPort"),
        ("UDP", socket.SOCK_DGRAM, config.networking.discovery_port, "networking.discoveryPort"),
    ]
    for proto, kind, port, option in wanted:
        problem = _port_in_use(kind, port)
        if problem and exo_running and problem == IN_USE:
            continue
        if problem:
            return _fail(
                "ports",
                f"{proto} port {port} ({option}) is {problem}",
                f"stop what listens there (ss -lntup 'sport = :{port}') or change {option}",
            )
    listed = ", ".join(f"{p} {n}" for p, _, n, _ in wanted)
    if exo_running:
        return _ok("ports", f"{listed}: free or held by this node's running EXO")
    return _ok("ports", f"{listed} are free")


# ---------------------------------------------------------------- interface


def check_interface(config: Config, host: Tree) -> list[CheckResult]:
    """The configured cluster interface, judged as ``exo-nixos net`` judges it."""
    from exo_nixos.network import choose_cluster_interface, inspect

    if not config.networking.bond_interface:
        return [
            _ok(
                "interface",
                "no cluster interface configured: EXO discovers peers on every interface "
                "with an IPv6 address",
            )
        ]
    choice = choose_cluster_interface(config, inspect(host.root))
    check = f"interface {choice.name}"
    results = [
        _fail(check, problem, "see `exo-nixos net` for the interfaces of this host")
        for problem in choice.problems
    ]
    results += [_warn(check, warning, "see `exo-nixos net`") for warning in choice.warnings]
    if not results:
        results.append(_ok(check, choice.reasons[0]))
    return results


def check_downloads(config: Config, host: Tree) -> list[CheckResult]:
    """Model downloads on, but the default route on an interface the node unit may not use."""
    net = config.networking
    allowed = net.allowed_interfaces
    if config.offline or allowed is None or net.network_namespace is not None:
        return []  # no restriction, or routes inside a namespace this check cannot see
    from exo_nixos.network import inspect

    routes = inspect(host.root).default_route_interfaces
    if not routes or any(name in allowed for name in routes):
        return []
    return [
        _warn(
            "downloads",
            f"model downloads are on, but the default route is on {', '.join(routes)}, which "
            f"the node unit may not use (RestrictNetworkInterfaces allows only "
            f"{', '.join(allowed)}), so EXO cannot reach the model hub",
            f'set services.exo.networking.downloadInterfaces = [ "{routes[0]}" ], or '
            "services.exo.offline = true to serve local models only",
        )
    ]


def check_model_cache(config: Config, host: Tree) -> list[CheckResult]:
    """The fast part of ``exo-nixos models verify`` (headers and sizes, no hashing) over the
    model dirs: damage only warns, EXO downloads what it finds missing or unusable."""
    from exo_nixos.models.verify import verify

    dirs = [config.effective_models_dir, *config.extra_model_dirs, *config.read_only_model_dirs]
    roots = [host.path(d) for d in dirs if host.path(d).is_dir()]
    reports = [r for r in verify(roots) if not r.clean]
    if not reports:
        return []
    damage = [d for r in reports for d in r.damage]
    first = damage[0]
    return [
        _warn(
            "model cache",
            f"{len(damage)} problem(s) in {len(reports)} model dir(s), first: {first.line()}",
            "exo-nixos models verify --repair (moves damaged files to quarantine, never deletes)",
        )
    ]


# ---------------------------------------------------------------- directories


@dataclass(frozen=True)
class DirectorySpec:
    option: str
    path: str
    writable: bool
    owned: bool
    private: bool


def directory_specs(config: Config) -> list[DirectorySpec]:
    sec = config.security
    specs = [
        DirectorySpec("security.dataDir", sec.data_dir, True, True, True),
        DirectorySpec("security.cacheDir", sec.cache_dir, True, True, True),
        DirectorySpec("security.runtimeDir", sec.runtime_dir, True, True, True),
        DirectorySpec("security.configDir", sec.config_dir, False, False, False),
        DirectorySpec("modelsDir", config.effective_models_dir, True, False, False),
    ]
    specs += [
        DirectorySpec("extraModelDirs", d, True, False, False) for d in config.extra_model_dirs
    ]
    specs += [
        DirectorySpec("readOnlyModelDirs", d, False, False, False)
        for d in config.read_only_model_dirs
    ]
    return specs


def _owner_ids(user: str, group: str) -> tuple[int | None, int | None]:
    try:
        uid: int | None = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = None
    try:
        gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    return uid, gid


def _parents(path: str) -> list[str]:
    """The directories above ``path``, from ``/`` down: each must be searchable to reach it."""
    parts = Path(path).parts
    return [str(Path(*parts[:depth])) for depth in range(1, len(parts))]


def _blocked_for(user: str, host: Tree, path: str, *, write: bool) -> tuple[str, str] | None:
    """Where ``user`` is stopped on the way to ``path`` (read, or write with ``write``), and
    how that was judged; None when it gets there.

    Run as that user (the unit's ExecStartPre), the kernel answers (access(2), ACLs
    included). Run as anyone else (root, an admin), the permission bits are read for the
    user's uid and groups; where the user does not exist here, for the caller."""
    target = host.path(path)
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        account = None
    if account is None or account.pw_uid == os.geteuid():
        caller = "as this user" if account is None else f"as {user}"
        if not os.access(target, (os.W_OK if write else os.R_OK) | os.X_OK):
            return path, caller
        return None
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}

    def allows(info: os.stat_result, bits: int) -> bool:
        if info.st_uid == account.pw_uid:
            return info.st_mode & (bits << 6) == bits << 6
        if info.st_gid in groups:
            return info.st_mode & (bits << 3) == bits << 3
        return info.st_mode & bits == bits

    judged = f"judged from permission bits for {user}; run as {user} for ACLs"
    for parent in _parents(path):
        try:
            if not allows(host.path(parent).stat(), 0o1):
                return parent, judged
        except OSError:
            return parent, judged
    if not allows(target.stat(), (0o3 if write else 0o5)):
        return path, judged
    return None


def check_directory(spec: DirectorySpec, host: Tree, config: Config) -> CheckResult:
    check = f"directory {spec.path}"
    path = host.path(spec.path)
    try:
        info = path.stat()
    except FileNotFoundError:
        parent = path.parent
        if spec.writable and not spec.owned and os.access(parent, os.W_OK | os.X_OK):
            return _ok(check, f"{spec.path} ({spec.option}) will be created by EXO")
        owner = f"-o {config.security.user} -g {config.security.group} -m 0750"
        return _fail(
            check,
            f"{spec.path} ({spec.option}) does not exist",
            f"create it: install -d {owner if spec.writable else '-m 0755'} {spec.path}",
        )
    except OSError as exc:
        if exc.errno == errno.EACCES:
            parents = _parents(spec.path)
            where = next((p for p in parents if not os.access(host.path(p), os.X_OK)), None)
            if where is not None:
                me = pwd.getpwuid(os.geteuid()).pw_name
                return _fail(
                    check,
                    f"{me} cannot enter {where}, so {spec.path} ({spec.option}) is out of reach",
                    f"chmod o+x {where} (or a group {me} is in), or move {spec.option}",
                )
        return _fail(check, f"{spec.path} cannot be read: {exc.strerror}", "check its permissions")
    if not stat.S_ISDIR(info.st_mode):
        return _fail(check, f"{spec.path} ({spec.option}) is not a directory", "point it elsewhere")
    mode = stat.S_IMODE(info.st_mode)
    if spec.owned:
        uid, gid = _owner_ids(config.security.user, config.security.group)
        if uid is not None and info.st_uid != uid:
            return _fail(
                check,
                f"{spec.path} is owned by uid {info.st_uid}, not {config.security.user}",
                f"chown -R {config.security.user}:{config.security.group} {spec.path}",
            )
        if gid is not None and info.st_gid != gid:
            return _warn(
                check,
                f"{spec.path} has group gid {info.st_gid}, not {config.security.group}",
                f"chgrp {config.security.group} {spec.path}",
            )
    if spec.private and mode & 0o007:
        return _warn(
            check,
            f"{spec.path} is accessible to all users (mode {mode:04o})",
            f"chmod o-rwx {spec.path}",
        )
    if mode & 0o002 and not mode & stat.S_ISVTX:
        return _fail(
            check,
            f"{spec.path} is world-writable (mode {mode:04o})",
            f"chmod o-w {spec.path}",
        )
    user = config.security.user
    blocked = _blocked_for(user, host, spec.path, write=spec.writable)
    if blocked is not None:
        where, judged = blocked
        need, able = ("write", "writable") if spec.writable else ("read", "readable")
        if where != spec.path:
            reason = f"{user} cannot enter {where}, so {spec.path} ({spec.option}) is out of reach"
            fix = f"chmod o+x {where} (or a group {user} is in), or move {spec.option}"
        else:
            reason = f"{spec.path} ({spec.option}) is not {able} for {user}"
            fix = f"give {user} {need} access" + (
                " (services.exo makes model directories outside the data dir writable via "
                "ReadWritePaths)"
                if spec.writable
                else ""
            )
        return _fail(check, f"{reason} ({judged})", fix)
    what = "writable" if spec.writable else "readable"
    return _ok(check, f"{spec.path} exists and is {what} (mode {mode:04o})")


# ---------------------------------------------------------------- disk and memory


def check_disk(config: Config, disk: Disk | None) -> CheckResult:
    """Free space for models, as detection measured it."""
    if disk is None:
        return _warn("disk", f"cannot find {config.effective_models_dir}", "create the model dir")
    free = disk.free_bytes
    text = f"{gib(free)} free for models in {config.effective_models_dir}"
    if free < DISK_FAIL_BYTES:
        return _fail("disk", text, "free space or set modelsDir to a larger filesystem")
    if free < DISK_WARN_BYTES:
        return _warn("disk", text + " (large models need more)", "free space or move modelsDir")
    return _ok("disk", text)


# Below this a memory limit cannot be meant: EXO's interpreter and ML stack need more to start.
MEMORY_LIMIT_FLOOR_BYTES = 1 * GIB


def check_memory(config: Config, total: int | None) -> CheckResult:
    """``hardware.memoryLimit`` against physical memory (``total``, from detection)."""
    if total is None:
        return _warn("memory", "cannot read MemTotal from /proc/meminfo", "check /proc is mounted")
    text = config.hardware.memory_limit
    if text is None:
        return _ok("memory", f"no memoryLimit; EXO may use all {gib(total)}")
    limit = MemoryLimit.parse(text).resolve(total)
    if limit < MEMORY_LIMIT_FLOOR_BYTES:
        return _fail(
            "memory",
            f"hardware.memoryLimit {text} is {limit / GIB:.3g} GiB: EXO's Python stack alone "
            "needs more, so the node would be killed for memory at every start",
            f"set hardware.memoryLimit to at least {MEMORY_LIMIT_FLOOR_BYTES // GIB} GiB "
            "(e.g. '80%' or '48G') or remove it",
        )
    if limit > total:
        return _fail(
            "memory",
            f"hardware.memoryLimit {text} ({gib(limit)}) exceeds physical memory ({gib(total)})",
            "lower hardware.memoryLimit or give it as a percentage",
        )
    return _ok("memory", f"memoryLimit {text} = {gib(limit)} of {gib(total)}")


# ---------------------------------------------------------------- devices

DEVICE_NODES: dict[Accelerator, tuple[str, ...]] = {
    Accelerator.CUDA: ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia[0-9]*"),
    Accelerator.ROCM: ("/dev/kfd", "/dev/dri/renderD*"),
    Accelerator.MLX: (),
    Accelerator.CPU: (),
}


def _expand(host: Tree, pattern: str) -> list[Path]:
    if "*" not in pattern:
        return [host.path(pattern)]
    parent = host.path(os.path.dirname(pattern))
    return sorted(parent.glob(os.path.basename(pattern))) if parent.is_dir() else []


def check_devices(accelerator: Accelerator, host: Tree) -> CheckResult:
    patterns = DEVICE_NODES[accelerator]
    if not patterns:
        return _ok("devices", f"{accelerator} needs no device nodes")
    checked = []
    for pattern in patterns:
        nodes = _expand(host, pattern)
        if not nodes or not all(n.exists() for n in nodes):
            return _fail(
                "devices",
                f"{pattern} missing for {accelerator}",
                "load the GPU driver (boot.kernelModules / hardware.nvidia) or set "
                'hardware.preferredAccelerator = "cpu"',
            )
        for node in nodes:
            if not os.access(node, os.R_OK | os.W_OK):
                return _fail(
                    "devices",
                    f"{node.relative_to(host.root)} is not accessible to this user",
                    "add the device to the unit's DeviceAllow and the user to its group "
                    "(render/video)",
                )
            checked.append(str(Path("/") / node.relative_to(host.root)))
    return _ok("devices", f"{accelerator}: {', '.join(checked)} accessible")


# ---------------------------------------------------------------- kubernetes


def check_kube_credentials(config: Config, host: Tree) -> CheckResult:
    """Credentials of the K3s registrar. EXO itself runs without them, so problems only warn."""
    k3s = config.k3s
    if not k3s.integration:
        return _ok("k3s credentials", "K3s integration off")
    files = [
        (name, kind)
        for name, kind in (
            (k3s.kubeconfig_file, "kubeconfig"),
            (k3s.token_file, "token"),
            (k3s.ca_file, "ca"),
        )
        if name
    ]
    if not files:
        return _warn(
            "k3s credentials",
            "k3s.integration is on but neither k3s.kubeconfigFile nor k3s.tokenFile is set: "
            "the registrar cannot start",
            "set k3s.kubeconfigFile (e.g. /etc/rancher/k3s/k3s.yaml on a server) or "
            "k3s.tokenFile with k3s.apiServer",
        )
    for name, kind in files:
        path = credential_path(name, kind)
        if path == Path(name):
            path = host.path(name)
        try:
            content = read_bounded(path)
        except OSError as exc:
            return _warn(
                "k3s credentials",
                f"{name} cannot be read here: {exc.strerror} (exo-k3s-registrar.service gets "
                "it through LoadCredential)",
                "check the path exists; run `exo-nixos preflight` as root to check its content",
            )
        if not content.strip():
            return _warn("k3s credentials", f"{name} is empty", "write the credential into it")
    return _ok("k3s credentials", f"{', '.join(n for n, _ in files)} readable")


# ---------------------------------------------------------------- all


def run_checks(
    config: Config,
    host: Tree,
    inventory: Inventory,
    accelerator: Accelerator,
    *,
    interface: bool = True,
    exo_running: bool = False,
) -> list[CheckResult]:
    """Every check; ``inventory`` is the hardware detection the caller already made.

    ``interface=False`` leaves out the cluster interface check, for a caller that judges the
    interface itself (``doctor``); ``exo_running``: this node's EXO answers on its API port,
    so the ports it holds are no conflict.
    """
    if host.is_live:
        results = [check_ports(config, exo_running=exo_running)]
    else:
        results = [_ok("ports", f"not checked: {host.root} is a captured tree, not this host")]
    if interface:
        results += check_interface(config, host)
    results += check_downloads(config, host)
    results += [check_directory(spec, host, config) for spec in directory_specs(config)]
    results += check_model_cache(config, host)
    results += [
        check_disk(config, inventory.disk),
        check_memory(config, inventory.memory.total_bytes),
        check_devices(accelerator, host),
        check_kube_credentials(config, host),
    ]
    if not host.is_live:  # the fixes are for the machine the tree was captured from
        results = [
            replace(r, fix=f"{r.fix} (on the machine {host.root} was captured from)")
            if r.fix
            else r
            for r in results
        ]
    return results
