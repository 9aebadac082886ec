"""Credentials for the registrar: a kubeconfig file, or a service-account token file.

Under systemd the files arrive through ``LoadCredential=``; the unit names them
``k3s-kubeconfig``, ``k3s-token`` and ``k3s-ca``, and a file of that name in
``$CREDENTIALS_DIRECTORY`` takes the place of the configured path (the service then needs
no read access to the original, root-only file).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.config import K3s
from exo_nixos.credentials import systemd_credential
from exo_nixos.errors import UserError
from exo_nixos.fsutil import os_reason, read_bounded

if TYPE_CHECKING:
    from lightkube import KubeConfig

CREDENTIAL_NAMES = {"kubeconfig": "k3s-kubeconfig", "token": "k3s-token", "ca": "k3s-ca"}


def credential_path(configured: str, kind: str) -> Path:
    """The file to read for ``configured``: systemd's credential copy when there is one."""
    return systemd_credential(configured, CREDENTIAL_NAMES[kind])


def _readable(path: Path, option: str) -> Path:
    try:
        read_bounded(path)  # a regular file of a sane size: a FIFO would block the client
    except FileNotFoundError:
        raise UserError(f"k3s.{option}: {path} does not exist; create it or fix the path") from None
    except OSError as exc:
        raise UserError(f"k3s.{option}: cannot read {path}: {os_reason(exc)}") from None
    return path


def _check_port(server: str) -> None:
    """ValueError when the API server URL's port cannot be connected to."""
    from urllib.parse import urlsplit

    try:
        port = urlsplit(server).port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"server {server}: the port must be 1 to 65535")


def kube_config(k3s: K3s) -> KubeConfig:
    """A lightkube ``KubeConfig`` from the k3s section; every problem is a UserError."""
    from lightkube import KubeConfig
    from lightkube.config.models import Cluster, User
    from lightkube.core.exceptions import ConfigError as KubeConfigError

    if k3s.kubeconfig_file:
        path = _readable(credential_path(k3s.kubeconfig_file, "kubeconfig"), "kubeconfigFile")
        try:
            config = KubeConfig.from_file(path)
            single = config.get()
            if single is not None:
                _check_port(single.cluster.server)
        except (KubeConfigError, KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"k3s.kubeconfigFile: {path} is not a usable kubeconfig ({exc}); "
                "point it at a file like /etc/rancher/k3s/k3s.yaml"
            ) from None
        except Exception as exc:  # yaml and msgspec raise their own types
            raise UserError(
                f"k3s.kubeconfigFile: {path} cannot be parsed ({type(exc).__name__}: {exc})"
            ) from None
        return config
    if k3s.token_file:
        if not k3s.api_server:
            raise UserError("k3s.tokenFile needs k3s.apiServer (e.g. https://10.0.0.1:6443)")
        token = _readable(credential_path(k3s.token_file, "token"), "tokenFile")
        if not token.read_text(encoding="utf-8", errors="replace").strip():
            raise UserError(f"k3s.tokenFile: {token} is empty; write the ServiceAccount token")
        ca = None
        if k3s.ca_file:
            ca = str(_readable(credential_path(k3s.ca_file, "ca"), "caFile"))
        cluster = Cluster(server=k3s.api_server, certificate_auth=ca)
        return KubeConfig.from_one(
            cluster=cluster, user=User(token_file=str(token)), namespace=k3s.namespace
        )
    raise UserError(
        "k3s: no credentials; set k3s.kubeconfigFile, or k3s.tokenFile with k3s.apiServer "
        "(and k3s.caFile) — see docs/k3s.md"
    )
