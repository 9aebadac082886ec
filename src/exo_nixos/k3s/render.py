"""The static Kubernetes objects that make EXO reachable as ``<service>.<namespace>.svc``.

Namespace, ServiceAccount (with a token Secret for nodes outside the cluster's pods), a Role
and RoleBinding holding exactly the verbs the registrar uses, a Service without selector
whose endpoints the registrars write, and, per allowed namespace, a NetworkPolicy letting its
pods reach EXO's port. Output is plain YAML, one document per object, so K3s can apply it from
``/var/lib/rancher/k3s/server/manifests``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import yaml

from exo_nixos.config import Config

MANAGED_BY = "exo-nixos"
PORT_NAME = "http"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"

# The verbs the registrar sends, and nothing else (see docs/k3s.md, "RBAC").
REGISTRAR_VERBS = ["get", "create", "update", "delete"]


@dataclass(frozen=True)
class Exposure:
    """Which port of each node the Service forwards to, and why."""

    port: int
    via_gateway: bool
    reason: str


def exposure(config: Config) -> Exposure:
    """The port pods reach on each node: the gateway when it listens beyond loopback.

    The gateway is the authenticated front door (API keys, optional TLS), so it is preferred.
    A gateway bound to loopback cannot be reached from pods; then the Service points at
    EXO's own API port, which EXO binds on every address.
    """
    gateway = config.gateway
    if gateway.enable and not ipaddress.ip_address(gateway.listen_address).is_loopback:
        return Exposure(gateway.port, True, f"the gateway on port {gateway.port}")
    why = (
        "the gateway is disabled"
        if not gateway.enable
        else f"the gateway listens on loopback ({gateway.listen_address})"
    )
    return Exposure(config.api_port, False, f"EXO's API port {config.api_port} ({why})")


def _labels(config: Config) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": config.k3s.service_name,
        "app.kubernetes.io/part-of": "exo",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _meta(config: Config, name: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = _labels(config)
    return meta


def registrar_role_name(config: Config) -> str:
    return f"{config.k3s.service_name}-registrar"


def token_secret_name(config: Config) -> str:
    return f"{config.k3s.service_account}-token"


def manifests(config: Config) -> list[dict[str, Any]]:
    """Every static object, in the order they can be applied."""
    k3s = config.k3s
    ns = k3s.namespace
    port = exposure(config).port
    role = registrar_role_name(config)
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(config, ns)},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(config, k3s.service_account, ns),
            "automountServiceAccountToken": False,
        },
        {
            # A long-lived token for registrars on the hosts (they are not pods, so they
            # cannot get projected tokens); see docs/k3s.md for copying it to a tokenFile.
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": {
                **_meta(config, token_secret_name(config), ns),
                "annotations": {"kubernetes.io/service-account.name": k3s.service_account},
            },
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(config, role, ns),
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": list(REGISTRAR_VERBS),
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(config, role, ns),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": k3s.service_account, "namespace": ns}],
        },
        {
            # No selector: the EndpointSlices labelled kubernetes.io/service-name=<name>
            # that the registrars keep are this Service's endpoints.
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(config, k3s.service_name, ns),
            "spec": {
                "type": "ClusterIP",
                "ports": [
                    {
                        "name": PORT_NAME,
                        "protocol": "TCP",
                        "port": port,
                        "targetPort": port,
                        "appProtocol": "http",
                    }
                ],
            },
        },
    ]
    for allowed in k3s.allowed_namespaces:
        objects.append(
            {
                # EXO runs on the hosts, not in a pod, so no policy can select it; what a
                # policy can do is let the allowed namespaces' pods out to its port when
                # they run with default-deny egress. See docs/k3s.md, "NetworkPolicy".
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": _meta(config, f"allow-egress-to-{k3s.service_name}", allowed),
                "spec": {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"protocol": "TCP", "port": port}]}],
                },
            }
        )
    return objects


def render_yaml(config: Config) -> str:
    """The manifests as one multi-document YAML text."""
    header = "# Generated by exo-nixos k3s render; applied by K3s from its manifests directory.\n"
    return header + yaml.safe_dump_all(manifests(config), sort_keys=False, explicit_start=True)
