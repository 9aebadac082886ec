"""Pre-flight checks, result by result: the exact status, reason and fix of every branch of
the directory, disk, memory, device, credential and interface checks, and what ``run_checks``
adds for a captured tree. An operator acts on these lines, so their wording is behaviour."""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path

import pytest

from exo_nixos.config import Accelerator, Config
from exo_nixos.hardware.model import Disk
from exo_nixos.hosttree import Tree
from exo_nixos.network import choose_cluster_interface, inspect
from exo_nixos.preflight import (
    CheckResult,
    DirectorySpec,
    Status,
    check_devices,
    check_directory,
    check_disk,
    check_interface,
    check_kube_credentials,
    check_memory,
    directory_specs,
    run_checks,
)
from exo_nixos.units import GIB
from tests.test_preflight import ME, MY_GROUP, NETWORK_FIXTURES, build_host, make_config

root_only = pytest.mark.skipif(os.getuid() != 0, reason="needs root to own files as nobody")
NOBODY = 65534


def ok(check: str, reason: str) -> CheckResult:
    return CheckResult(check, Status.OK, reason)


def warn(check: str, reason: str, fix: str) -> CheckResult:
    return CheckResult(check, Status.WARN, reason, fix)


def fail(check: str, reason: str, fix: str) -> CheckResult:
    return CheckResult(check, Status.FAIL, reason, fix)


@pytest.fixture
def host(tmp_path: Path) -> Tree:
    return build_host(tmp_path)


# ---------------------------------------------------------------- directory_specs


def test_directory_specs_list_every_directory_with_what_is_asked_of_it(host: Tree) -> None:
    cfg = make_config(
        host.root, extraModelDirs=["/srv/a", "/srv/b"], readOnlyModelDirs=["/ro/c", "/ro/d"]
    )
    assert directory_specs(cfg) == [
        DirectorySpec("security.dataDir", "/var/lib/exo", True, True, True),
        DirectorySpec("security.cacheDir", "/var/cache/exo", True, True, True),
        DirectorySpec("security.runtimeDir", "/run/exo", True, True, True),
        DirectorySpec("security.configDir", "/etc/exo", False, False, False),
        DirectorySpec("modelsDir", "/var/lib/exo/models", True, False, False),
        DirectorySpec("extraModelDirs", "/srv/a", True, False, False),
        DirectorySpec("extraModelDirs", "/srv/b", True, False, False),
        DirectorySpec("readOnlyModelDirs", "/ro/c", False, False, False),
        DirectorySpec("readOnlyModelDirs", "/ro/d", False, False, False),
    ]
    assert directory_specs(make_config(host.root, modelsDir="/models"))[4] == DirectorySpec(
        "modelsDir", "/models", True, False, False
    )


# ---------------------------------------------------------------- check_directory


def test_every_directory_of_a_good_tree_is_ok_with_its_mode(host: Tree) -> None:
    cfg = make_config(host.root)
    results = [check_directory(s, host, cfg) for s in directory_specs(cfg)]
    assert results == [
        ok("directory /var/lib/exo", "/var/lib/exo exists and is writable (mode 0750)"),
        ok("directory /var/cache/exo", "/var/cache/exo exists and is writable (mode 0750)"),
        ok("directory /run/exo", "/run/exo exists and is writable (mode 0750)"),
        ok("directory /etc/exo", "/etc/exo exists and is readable (mode 0755)"),
        ok(
            "directory /var/lib/exo/models",
            "/var/lib/exo/models (modelsDir) will be created by EXO",
        ),
    ]


def test_a_missing_directory_says_how_to_create_it(host: Tree) -> None:
    cfg = make_config(host.root, extraModelDirs=["/srv/none/models"])
    (host.root / "var/lib/exo").rmdir()
    (host.root / "etc/exo").rmdir()
    specs = {s.path: s for s in directory_specs(cfg)}
    owner = f"-o {ME} -g {MY_GROUP} -m 0750"
    assert check_directory(specs["/var/lib/exo"], host, cfg) == fail(
        "directory /var/lib/exo",
        "/var/lib/exo (security.dataDir) does not exist",
        f"create it: install -d {owner} /var/lib/exo",
    )
    # read only: readable by all is enough
    assert check_directory(specs["/etc/exo"], host, cfg) == fail(
        "directory /etc/exo",
        "/etc/exo (security.configDir) does not exist",
        "create it: install -d -m 0755 /etc/exo",
    )
    # a model directory EXO would create, but its parent is missing too
    assert check_directory(specs["/srv/none/models"], host, cfg) == fail(
        "directory /srv/none/models",
        "/srv/none/models (extraModelDirs) does not exist",
        f"create it: install -d {owner} /srv/none/models",
    )
    # with the parent there, EXO creates it: the service user must write and enter it
    (host.root / "srv/none").mkdir(parents=True)
    real_access, asked = os.access, []

    def access(path: object, mode: int, **kwargs: object) -> bool:
        asked.append(mode)
        return real_access(path, mode)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access", access)
        check_directory(specs["/srv/none/models"], host, cfg)
    assert asked[0] == os.W_OK | os.X_OK
    assert check_directory(specs["/srv/none/models"], host, cfg) == ok(
        "directory /srv/none/models", "/srv/none/models (extraModelDirs) will be created by EXO"
    )


def test_a_missing_read_only_model_dir_is_not_created_by_exo(host: Tree) -> None:
    cfg = make_config(host.root, readOnlyModelDirs=["/srv/ro"])
    (host.root / "srv").mkdir()
    assert check_directory(directory_specs(cfg)[-1], host, cfg) == fail(
        "directory /srv/ro",
        "/srv/ro (readOnlyModelDirs) does not exist",
        "create it: install -d -m 0755 /srv/ro",
    )


def test_a_missing_owned_directory_is_not_left_to_exo(host: Tree) -> None:
    """The state directories must exist with their owner even where the parent is writable."""
    cfg = make_config(host.root)
    (host.root / "run/exo").rmdir()
    result = check_directory(directory_specs(cfg)[2], host, cfg)
    assert result.status is Status.FAIL and result.reason.endswith("does not exist")


def test_a_path_through_a_file_cannot_be_read(host: Tree) -> None:
    cfg = make_config(host.root, extraModelDirs=["/srv/file/models"])
    (host.root / "srv").mkdir()
    (host.root / "srv/file").write_text("")
    assert check_directory(directory_specs(cfg)[5], host, cfg) == fail(
        "directory /srv/file/models",
        "/srv/file/models cannot be read: Not a directory",
        "check its permissions",
    )


def test_a_directory_the_caller_cannot_reach_names_the_closed_parent(
    host: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a non-root caller meets (stat answers EACCES): the first parent it cannot enter."""
    cfg = make_config(host.root, extraModelDirs=["/home/alice/models"])
    (host.root / "home/alice/models").mkdir(parents=True)
    closed = host.root / "home/alice"
    target = host.root / "home/alice/models"
    real_stat, real_access = Path.stat, os.access

    def stat(self: Path, **kwargs: object) -> os.stat_result:
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, **kwargs)  # type: ignore[arg-type]

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if Path(str(path)) in {closed, target}:
            return False
        return real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(os, "access", access)
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert check_directory(directory_specs(cfg)[5], host, cfg) == fail(
        "directory /home/alice/models",
        f"{me} cannot enter /home/alice, so /home/alice/models (extraModelDirs) is out of reach",
        f"chmod o+x /home/alice (or a group {me} is in), or move extraModelDirs",
    )
    # denied, but every parent can be entered: the directory itself cannot be read
    monkeypatch.setattr(os, "access", lambda path, mode, **_: Path(str(path)) != target)
    assert check_directory(directory_specs(cfg)[5], host, cfg) == fail(
        "directory /home/alice/models",
        "/home/alice/models cannot be read: Permission denied",
        "check its permissions",
    )


def test_a_file_where_a_directory_belongs(host: Tree) -> None:
    cfg = make_config(host.root, extraModelDirs=["/srv/file"])
    (host.root / "srv").mkdir()
    (host.root / "srv/file").write_text("")
    assert check_directory(directory_specs(cfg)[5], host, cfg) == fail(
        "directory /srv/file", "/srv/file (extraModelDirs) is not a directory", "point it elsewhere"
    )


@pytest.mark.parametrize("mode", [0o751, 0o754, 0o752, 0o755])
def test_a_private_directory_open_to_others_warns(host: Tree, mode: int) -> None:
    cfg = make_config(host.root)
    (host.root / "var/cache/exo").chmod(mode)
    assert check_directory(directory_specs(cfg)[1], host, cfg) == warn(
        "directory /var/cache/exo",
        f"/var/cache/exo is accessible to all users (mode {mode:04o})",
        "chmod o-rwx /var/cache/exo",
    )


def test_a_shared_directory_may_be_readable_by_all_but_not_writable(host: Tree) -> None:
    cfg = make_config(host.root, extraModelDirs=["/srv/models"])
    (host.root / "srv/models").mkdir(parents=True)
    spec = directory_specs(cfg)[5]
    (host.root / "srv/models").chmod(0o755)
    assert check_directory(spec, host, cfg).status is Status.OK
    (host.root / "srv/models").chmod(0o777)
    assert check_directory(spec, host, cfg) == fail(
        "directory /srv/models",
        "/srv/models is world-writable (mode 0777)",
        "chmod o-w /srv/models",
    )
    (host.root / "srv/models").chmod(0o1777)  # sticky, as /tmp: others cannot remove files
    assert check_directory(spec, host, cfg) == ok(
        "directory /srv/models", "/srv/models exists and is writable (mode 1777)"
    )


@root_only
def test_a_state_directory_owned_by_another_user_fails_with_chown(host: Tree) -> None:
    cfg = make_config(host.root)
    os.chown(host.root / "var/lib/exo", NOBODY, -1)
    assert check_directory(directory_specs(cfg)[0], host, cfg) == fail(
        "directory /var/lib/exo",
        f"/var/lib/exo is owned by uid {NOBODY}, not {ME}",
        f"chown -R {ME}:{MY_GROUP} /var/lib/exo",
    )


@root_only
def test_a_state_directory_of_another_group_warns_with_chgrp(host: Tree) -> None:
    cfg = make_config(host.root)
    os.chown(host.root / "run/exo", -1, NOBODY)
    assert check_directory(directory_specs(cfg)[2], host, cfg) == warn(
        "directory /run/exo",
        f"/run/exo has group gid {NOBODY}, not {MY_GROUP}",
        f"chgrp {MY_GROUP} /run/exo",
    )


def test_owner_and_group_are_not_judged_for_an_unknown_user(host: Tree) -> None:
    """A user or group this host does not know (a captured tree) is not held against it."""
    cfg = make_config(host.root)
    security = {**cfg.security.model_dump(by_alias=True), "user": "exo-x", "group": "exo-x"}
    cfg = make_config(host.root, security=security)
    result = check_directory(directory_specs(cfg)[0], host, cfg)
    assert result == ok("directory /var/lib/exo", "/var/lib/exo exists and is writable (mode 0750)")


def test_model_dirs_are_not_judged_for_owner_or_mode(host: Tree) -> None:
    cfg = make_config(host.root, extraModelDirs=["/srv/models"])
    (host.root / "srv/models").mkdir(parents=True)
    (host.root / "srv/models").chmod(0o755)
    if os.getuid() == 0:
        os.chown(host.root / "srv/models", NOBODY, NOBODY)
    assert check_directory(directory_specs(cfg)[5], host, cfg).status is Status.OK


# ---------------------------------------------------------------- judged for the service user


def nobody_config(root: Path, **overrides: object) -> Config:
    cfg = make_config(root, **overrides)
    security = {**cfg.security.model_dump(by_alias=True), "user": "nobody", "group": "nogroup"}
    return make_config(root, security=security, **overrides)


JUDGED = "judged from permission bits for nobody; run as nobody for ACLs"


@root_only
@pytest.mark.parametrize(
    ("owner", "mode", "writable", "allowed"),
    [
        # owner bits decide for the owner, even where group or others could
        ((NOBODY, 0), 0o700, True, True),
        ((NOBODY, 0), 0o300, True, True),
        ((NOBODY, 0), 0o500, True, False),
        ((NOBODY, 0), 0o600, True, False),
        ((NOBODY, 0), 0o500, False, True),
        ((NOBODY, 0), 0o100, False, False),
        ((NOBODY, 0), 0o055, False, False),
        # group bits for the user's group, when not the owner
        ((0, NOBODY), 0o030, True, True),
        ((0, NOBODY), 0o050, True, False),
        ((0, NOBODY), 0o050, False, True),
        ((0, NOBODY), 0o705, False, False),
        # others' bits otherwise
        ((0, 0), 0o005, False, True),
        ((0, 0), 0o004, False, False),
        ((0, 0), 0o001, False, False),
        ((0, 0), 0o750, False, False),
        ((0, 0), 0o1003, True, True),
        ((0, 0), 0o1005, True, False),
    ],
)
def test_access_for_the_service_user_is_read_from_its_permission_bits(
    tmp_path: Path, owner: tuple[int, int], mode: int, writable: bool, allowed: bool
) -> None:
    tmp_path.chmod(0o755)
    (tmp_path / "srv/models").mkdir(parents=True)
    (tmp_path / "srv").chmod(0o755)
    os.chown(tmp_path / "srv/models", *owner)
    (tmp_path / "srv/models").chmod(mode)
    cfg = nobody_config(tmp_path)
    spec = DirectorySpec("modelsDir", "/srv/models", writable, False, False)
    result = check_directory(spec, Tree(tmp_path), cfg)
    if allowed:
        what = "writable" if writable else "readable"
        assert result == ok(
            "directory /srv/models", f"/srv/models exists and is {what} (mode {mode:04o})"
        )
    elif writable:
        assert result == fail(
            "directory /srv/models",
            f"/srv/models (modelsDir) is not writable for nobody ({JUDGED})",
            "give nobody write access (services.exo makes model directories outside the data "
            "dir writable via ReadWritePaths)",
        )
    else:
        assert result == fail(
            "directory /srv/models",
            f"/srv/models (modelsDir) is not readable for nobody ({JUDGED})",
            "give nobody read access",
        )


@root_only
@pytest.mark.parametrize("parent_mode", [0o700, 0o754, 0o744])
def test_a_parent_the_service_user_cannot_enter_is_named(tmp_path: Path, parent_mode: int) -> None:
    tmp_path.chmod(0o755)
    (tmp_path / "srv/deep/models").mkdir(parents=True)
    (tmp_path / "srv").chmod(0o755)
    (tmp_path / "srv/deep").chmod(parent_mode)
    (tmp_path / "srv/deep/models").chmod(0o755)
    cfg = nobody_config(tmp_path)
    spec = DirectorySpec("extraModelDirs", "/srv/deep/models", False, False, False)
    assert check_directory(spec, Tree(tmp_path), cfg) == fail(
        "directory /srv/deep/models",
        "nobody cannot enter /srv/deep, so /srv/deep/models (extraModelDirs) is out of reach "
        f"({JUDGED})",
        "chmod o+x /srv/deep (or a group nobody is in), or move extraModelDirs",
    )
    (tmp_path / "srv/deep").chmod(0o711)  # search is enough for a parent
    assert check_directory(spec, Tree(tmp_path), cfg).status is Status.OK


@root_only
def test_the_tree_root_itself_must_be_enterable(tmp_path: Path) -> None:
    (tmp_path / "srv/models").mkdir(parents=True)
    (tmp_path / "srv").chmod(0o755)
    tmp_path.chmod(0o700)  # the tree's "/"
    cfg = nobody_config(tmp_path)
    spec = DirectorySpec("modelsDir", "/srv/models", False, False, False)
    assert check_directory(spec, Tree(tmp_path), cfg).reason == (
        f"nobody cannot enter /, so /srv/models (modelsDir) is out of reach ({JUDGED})"
    )


@root_only
def test_a_parent_that_is_not_there_stops_the_service_user(tmp_path: Path) -> None:
    """A parent that cannot be looked at (here: a file where a directory should be) counts as
    closed."""
    from exo_nixos.preflight import _blocked_for

    tmp_path.chmod(0o755)
    (tmp_path / "srv").write_text("")
    assert _blocked_for("nobody", Tree(tmp_path), "/srv/models", write=False) == ("/srv", JUDGED)


def test_the_caller_as_the_service_user_is_judged_by_the_kernel(
    host: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as the service user (ExecStartPre), access(2) answers; root may enter anything."""
    from exo_nixos.preflight import _blocked_for

    asked: list[int] = []
    real_access = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        asked.append(mode)
        return real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    _blocked_for(ME, host, "/var/lib/exo", write=True)
    _blocked_for(ME, host, "/etc/exo", write=False)
    assert asked == [os.W_OK | os.X_OK, os.R_OK | os.X_OK]

    assert _blocked_for(ME, host, "/var/lib/exo", write=True) is None
    assert _blocked_for(ME, host, "/nonexistent/dir", write=False) == (
        "/nonexistent/dir",
        f"as {ME}",
    )
    assert _blocked_for("exo-nobody-here", host, "/nonexistent", write=True) == (
        "/nonexistent",
        "as this user",
    )
    assert _blocked_for("exo-nobody-here", host, "/etc/exo", write=False) is None


# ---------------------------------------------------------------- disk


def disk(free: int) -> Disk:
    return Disk(
        requested="/var/lib/exo/models", measured="/var/lib", free_bytes=free, total_bytes=1
    )


@pytest.mark.parametrize(
    ("free", "expected"),
    [
        (
            0,
            fail(
                "disk",
                "0.0 GiB free for models in /var/lib/exo/models",
                "free space or set modelsDir to a larger filesystem",
            ),
        ),
        (
            2 * GIB - 1,
            fail(
                "disk",
                "2.0 GiB free for models in /var/lib/exo/models",
                "free space or set modelsDir to a larger filesystem",
            ),
        ),
        (
            2 * GIB,
            warn(
                "disk",
                "2.0 GiB free for models in /var/lib/exo/models (large models need more)",
                "free space or move modelsDir",
            ),
        ),
        (
            50 * GIB - 1,
            warn(
                "disk",
                "50.0 GiB free for models in /var/lib/exo/models (large models need more)",
                "free space or move modelsDir",
            ),
        ),
        (50 * GIB, ok("disk", "50.0 GiB free for models in /var/lib/exo/models")),
        (GIB * 3 // 2 * 100, ok("disk", "150.0 GiB free for models in /var/lib/exo/models")),
    ],
)
def test_disk_thresholds_and_wording(host: Tree, free: int, expected: CheckResult) -> None:
    assert check_disk(make_config(host.root), disk(free)) == expected


def test_disk_not_found_warns(host: Tree) -> None:
    assert check_disk(make_config(host.root, modelsDir="/m"), None) == warn(
        "disk", "cannot find /m", "create the model dir"
    )


# ---------------------------------------------------------------- memory

TOTAL = 64 * GIB


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (None, ok("memory", "no memoryLimit; EXO may use all 64.0 GiB")),
        ("48G", ok("memory", "memoryLimit 48G = 48.0 GiB of 64.0 GiB")),
        ("1G", ok("memory", "memoryLimit 1G = 1.0 GiB of 64.0 GiB")),
        ("100%", ok("memory", "memoryLimit 100% = 64.0 GiB of 64.0 GiB")),
        ("64G", ok("memory", "memoryLimit 64G = 64.0 GiB of 64.0 GiB")),
        (
            "65G",
            fail(
                "memory",
                "hardware.memoryLimit 65G (65.0 GiB) exceeds physical memory (64.0 GiB)",
                "lower hardware.memoryLimit or give it as a percentage",
            ),
        ),
        (
            "1023M",
            fail(
                "memory",
                "hardware.memoryLimit 1023M is 0.999 GiB: EXO's Python stack alone needs more, "
                "so the node would be killed for memory at every start",
                "set hardware.memoryLimit to at least 1 GiB (e.g. '80%' or '48G') or remove it",
            ),
        ),
    ],
)
def test_memory_limit_wording(host: Tree, limit: str | None, expected: CheckResult) -> None:
    cfg = make_config(host.root, hardware={"memoryLimit": limit})
    assert check_memory(cfg, TOTAL) == expected


def test_memory_limit_just_over_physical_memory_fails(host: Tree) -> None:
    cfg = make_config(host.root, hardware={"memoryLimit": "65537M"})
    assert check_memory(cfg, TOTAL).status is Status.FAIL


def test_memory_total_unknown_warns(host: Tree) -> None:
    assert check_memory(make_config(host.root), None) == warn(
        "memory", "cannot read MemTotal from /proc/meminfo", "check /proc is mounted"
    )


# ---------------------------------------------------------------- devices

NO_DRIVER = (
    "load the GPU driver (boot.kernelModules / hardware.nvidia) or set "
    'hardware.preferredAccelerator = "cpu"'
)


def test_device_nodes_each_missing_one_named(host: Tree) -> None:
    dev = host.root / "dev"
    dev.mkdir()
    assert check_devices(Accelerator.CUDA, host) == fail(
        "devices", "/dev/nvidiactl missing for cuda", NO_DRIVER
    )
    (dev / "nvidiactl").write_text("")
    assert check_devices(Accelerator.CUDA, host) == fail(
        "devices", "/dev/nvidia-uvm missing for cuda", NO_DRIVER
    )
    (dev / "nvidia-uvm").write_text("")
    assert check_devices(Accelerator.CUDA, host) == fail(
        "devices", "/dev/nvidia[0-9]* missing for cuda", NO_DRIVER
    )
    (dev / "nvidia1").write_text("")
    (dev / "nvidia0").write_text("")
    assert check_devices(Accelerator.CUDA, host) == ok(
        "devices",
        "cuda: /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia0, /dev/nvidia1 accessible",
    )


def test_rocm_device_nodes(host: Tree) -> None:
    dev = host.root / "dev"
    dev.mkdir()
    (dev / "kfd").write_text("")
    # no /dev/dri at all: the glob's directory is missing
    assert check_devices(Accelerator.ROCM, host) == fail(
        "devices", "/dev/dri/renderD* missing for rocm", NO_DRIVER
    )
    (dev / "dri").mkdir()
    (dev / "dri/card0").write_text("")
    assert check_devices(Accelerator.ROCM, host).status is Status.FAIL
    (dev / "dri/renderD128").write_text("")
    assert check_devices(Accelerator.ROCM, host) == ok(
        "devices", "rocm: /dev/kfd, /dev/dri/renderD128 accessible"
    )


def test_a_dangling_device_node_is_missing(host: Tree) -> None:
    dev = host.root / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0"):
        (dev / name).write_text("")
    (dev / "nvidia1").symlink_to(dev / "gone")
    assert check_devices(Accelerator.CUDA, host).reason == "/dev/nvidia[0-9]* missing for cuda"


@pytest.mark.parametrize("accelerator", [Accelerator.CPU, Accelerator.MLX])
def test_accelerators_without_device_nodes(host: Tree, accelerator: Accelerator) -> None:
    assert check_devices(accelerator, host) == ok("devices", f"{accelerator} needs no device nodes")


def test_an_inaccessible_device_node_is_named(host: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = host.root / "dev"
    (dev / "dri").mkdir(parents=True)
    (dev / "kfd").write_text("")
    (dev / "dri/renderD128").write_text("")
    closed = dev / "dri/renderD128"
    real_access = os.access
    seen: list[int] = []

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if Path(str(path)) == closed:
            seen.append(mode)
            return False
        return real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    assert check_devices(Accelerator.ROCM, host) == fail(
        "devices",
        "dev/dri/renderD128 is not accessible to this user",
        "add the device to the unit's DeviceAllow and the user to its group (render/video)",
    )
    assert seen == [os.R_OK | os.W_OK]


# ---------------------------------------------------------------- kubernetes credentials


def test_kube_credentials_wording(host: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert check_kube_credentials(make_config(host.root), host) == ok(
        "k3s credentials", "K3s integration off"
    )
    cfg = make_config(host.root, k3s={"integration": True})
    assert check_kube_credentials(cfg, host) == warn(
        "k3s credentials",
        "k3s.integration is on but neither k3s.kubeconfigFile nor k3s.tokenFile is set: "
        "the registrar cannot start",
        "set k3s.kubeconfigFile (e.g. /etc/rancher/k3s/k3s.yaml on a server) or "
        "k3s.tokenFile with k3s.apiServer",
    )
    k3s = {
        "integration": True,
        "apiServer": "https://10.0.0.1:6443",
        "tokenFile": "/etc/k3s/token",
        "caFile": "/etc/k3s/ca.crt",
    }
    cfg = make_config(host.root, k3s=k3s)
    assert check_kube_credentials(cfg, host) == warn(
        "k3s credentials",
        "/etc/k3s/token cannot be read here: No such file or directory "
        "(exo-k3s-registrar.service gets it through LoadCredential)",
        "check the path exists; run `exo-nixos preflight` as root to check its content",
    )
    (host.root / "etc/k3s").mkdir()
    (host.root / "etc/k3s/token").write_text("secret\n")
    assert check_kube_credentials(cfg, host).reason.startswith("/etc/k3s/ca.crt cannot be read")
    (host.root / "etc/k3s/ca.crt").write_text(" \n\t")
    assert check_kube_credentials(cfg, host) == warn(
        "k3s credentials", "/etc/k3s/ca.crt is empty", "write the credential into it"
    )
    (host.root / "etc/k3s/ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    assert check_kube_credentials(cfg, host) == ok(
        "k3s credentials", "/etc/k3s/token, /etc/k3s/ca.crt readable"
    )


def test_kube_credentials_come_from_systemd_credentials_first(
    host: Tree, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the registrar's unit the files arrive through LoadCredential: the copy in
    $CREDENTIALS_DIRECTORY is read, not the configured path (which need not exist here)."""
    credentials = tmp_path_factory.mktemp("credentials")
    (credentials / "k3s-kubeconfig").write_text("apiVersion: v1\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    cfg = make_config(host.root, k3s={"integration": True, "kubeconfigFile": "/etc/k3s.yaml"})
    assert check_kube_credentials(cfg, host) == ok("k3s credentials", "/etc/k3s.yaml readable")
    (credentials / "k3s-kubeconfig").write_text("")
    assert check_kube_credentials(cfg, host).reason == "/etc/k3s.yaml is empty"


# ---------------------------------------------------------------- interface


def test_no_cluster_interface_wording(host: Tree) -> None:
    assert check_interface(make_config(host.root), host) == [
        ok(
            "interface",
            "no cluster interface configured: EXO discovers peers on every interface with an "
            "IPv6 address",
        )
    ]


@pytest.mark.parametrize(
    ("tree", "interface"),
    [
        ("bond-active-backup", "bond0"),
        ("bond-active-backup-degraded", "bond0"),
        ("no-ipv6", "eth0"),
        ("bond-active-backup", "bond9"),
    ],
)
def test_cluster_interface_results_carry_the_choice(tmp_path: Path, tree: str, interface: str):
    host = Tree(NETWORK_FIXTURES / tree)
    cfg = make_config(tmp_path, networking={"bondInterface": interface, "rdmaEnabled": False})
    choice = choose_cluster_interface(cfg, inspect(host.root))
    check = f"interface {interface}"
    expected = [
        fail(check, p, "see `exo-nixos net` for the interfaces of this host")
        for p in choice.problems
    ] + [warn(check, w, "see `exo-nixos net`") for w in choice.warnings]
    assert check_interface(cfg, host) == (expected or [ok(check, choice.reasons[0])])


def test_downloads_warning_wording(tmp_path: Path) -> None:
    from tests.test_preflight import _downloads

    assert _downloads("bond-balance-alb", tmp_path) == [
        warn(
            "downloads",
            "model downloads are on, but the default route is on wlp2s0, which the node unit "
            "may not use (RestrictNetworkInterfaces allows only lo, bond1), so EXO cannot reach "
            "the model hub",
            'set services.exo.networking.downloadInterfaces = [ "wlp2s0" ], or '
            "services.exo.offline = true to serve local models only",
        )
    ]


# ---------------------------------------------------------------- run_checks


def test_a_captured_tree_is_not_port_checked_and_its_fixes_say_where(host: Tree) -> None:
    from exo_nixos.hardware import detect

    cfg = make_config(host.root, readOnlyModelDirs=["/srv/ro"])
    inventory = detect(host.root, use_nvml=False, models_dir=cfg.effective_models_dir)
    results = run_checks(cfg, host, inventory, Accelerator.CPU)
    assert results[0] == ok("ports", f"not checked: {host.root} is a captured tree, not this host")
    assert [r.check for r in results] == [
        "ports",
        "interface",
        *(f"directory {s.path}" for s in directory_specs(cfg)),
        "disk",
        "memory",
        "devices",
        "k3s credentials",
    ]
    by_check = {r.check: r for r in results}
    assert by_check["directory /srv/ro"].fix == (
        f"create it: install -d -m 0755 /srv/ro (on the machine {host.root} was captured from)"
    )
    assert all(r.fix == "" for r in results if r.status is Status.OK)
    assert by_check["memory"] == ok("memory", "no memoryLimit; EXO may use all 62.5 GiB")
    # each check judged this config, this tree and this inventory
    assert by_check["disk"] == check_disk(cfg, inventory.disk)
    assert by_check["devices"] == check_devices(Accelerator.CPU, host)
    without = run_checks(cfg, host, inventory, Accelerator.CPU, interface=False)
    assert "interface" not in [r.check for r in without]


def test_the_live_host_is_port_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from exo_nixos import preflight

    calls: list[bool] = []

    def ports(config: Config, *, exo_running: bool = False) -> CheckResult:
        assert config is cfg
        calls.append(exo_running)
        return ok("ports", "stand-in")

    monkeypatch.setattr(preflight, "check_ports", ports)
    host = Tree(Path("/"))
    assert host.is_live and host.root == Path("/")
    assert Tree(Path("/tmp/..")).is_live
    cfg = make_config(Path("/"), k3s={"integration": True})
    from exo_nixos.hardware import detect

    inventory = detect(Path("/"), use_nvml=False, models_dir=cfg.effective_models_dir)
    results = run_checks(cfg, host, inventory, Accelerator.CPU, exo_running=True)
    assert calls == [True] and results[0] == ok("ports", "stand-in")
    assert not any("captured from" in r.fix for r in results)
    # the credential check looked at this host (none configured: it says so)
    assert results[-1].reason.startswith("k3s.integration is on but neither")
    run_checks(cfg, host, inventory, Accelerator.CPU)
    assert calls == [True, False]


def test_host_paths_are_under_its_root(tmp_path: Path) -> None:
    host = Tree(tmp_path)
    assert not host.is_live
    assert host.path("/etc/exo") == tmp_path / "etc/exo"
    assert host.path(Path("/etc/exo")) == tmp_path / "etc/exo"
    assert host.path("etc") == tmp_path / "etc"
    assert host.path("/X11/xorg.conf") == tmp_path / "X11/xorg.conf"
