"""The config contract between the NixOS module and the Python tool.

One JSON document (``/etc/exo/config.json`` on a host), written by the module from the
``services.exo`` options and parsed here by one typed model that every command uses. Keys are
the option names, nested and spelled the same (camelCase). ``schemaVersion`` guards changes.
"""

from __future__ import annotations

import copy
import difflib
import functools
import ipaddress
import json
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from exo_nixos import jsonio
from exo_nixos.basetypes import (
    DEFAULT_CONFIG_PATH,
    EXO_API_PORT,
    EXO_DISCOVERY_PORT,
    EXO_ZENOH_PORT,
    PATTERNS,
    Accelerator,
    MemoryLimit,
    check,
)
from exo_nixos.errors import ConfigError, describe_value
from exo_nixos.fsutil import os_reason, read_bounded

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EXO_API_PORT",
    "EXO_DISCOVERY_PORT",
    "EXO_ZENOH_PORT",
    "Accelerator",
    "Config",
    "MemoryLimit",
    "load_config",
    "parse_config",
]

SCHEMA_VERSION = 1
# The most a config file may hold: a real one is a few KiB (a thousand models, some 200 KiB);
# /dev/zero or a runaway pipe named by --config is refused at this size, not read for ever.
CONFIG_FILE_LIMIT = 8 << 20

GATEWAY_PORT = 52417
EXPORTER_PORT = 52418


class Mode(StrEnum):
    MASTER = "master"
    WORKER = "worker"
    AUTO = "auto"


LogLevel = Literal["error", "warning", "info", "debug"]

Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def _ip_address(value: str) -> str:
    try:
        if "%" in value:  # a zone index: the option types refuse it too
            raise ValueError
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address such as 0.0.0.0 or ::1") from None
    return value


def _memory_limit(value: str) -> str:
    MemoryLimit.parse(value)
    return value


def _url(value: str) -> str:
    url = check("url", value).rstrip("/")
    try:
        port = urllib.parse.urlsplit(url).port
    except ValueError:  # not a number, or above 65535
        port = 0
    if port == 0:
        raise ValueError("the port must be 1 to 65535")
    return url


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL byte (no program can receive one)")
    return value


@dataclass(frozen=True)
class _Syntax:
    """A string of the syntax ``kind`` of patterns.json: checked by ``check``, and stated as
    an anchored ``pattern`` in the JSON Schema (the one the NixOS option types use)."""

    kind: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        check_kind = functools.partial(check, self.kind)
        return core_schema.no_info_after_validator_function(check_kind, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        spec = PATTERNS[self.kind]
        json_schema["pattern"] = f"^(?:{spec['pattern']})$"
        if "maxLength" in spec:
            json_schema["maxLength"] = spec["maxLength"]
        return json_schema


# the syntaxes of patterns.json, which the NixOS option types (nix/modules/lib/types.nix) read
InterfaceName = Annotated[str, _Syntax("interfaceName")]
AbsolutePath = Annotated[str, _Syntax("absolutePath")]
GfxVersion = Annotated[str, _Syntax("gfxVersion")]
DriverVersion = Annotated[str, _Syntax("driverVersion")]
ComputeCapability = Annotated[str, _Syntax("computeCapability")]
K8sName = Annotated[str, _Syntax("k8sName")]
NetnsName = Annotated[str, _Syntax("netnsName")]
UserName = Annotated[str, _Syntax("userName")]
PublicPath = Annotated[str, _Syntax("publicPath")]
ClusterNamespace = Annotated[str, _Syntax("clusterNamespace")]
DeviceId = Annotated[str, _Syntax("deviceId")]
K8sSubdomain = Annotated[str, _Syntax("k8sSubdomain")]
MemoryLimitText = Annotated[str, AfterValidator(_memory_limit)]
IPAddress = Annotated[str, AfterValidator(_ip_address)]
Url = Annotated[str, AfterValidator(_url)]
# what execve and systemd take as a variable name (systemd: env_name_is_valid)
EnvName = Annotated[str, _Syntax("envName")]
ModelId = Annotated[str, _Syntax("modelId")]
NoNul = Annotated[str, AfterValidator(_no_nul)]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        use_enum_values=False,
    )


class PortRange(_Section):
    from_: Port = Field(49153, alias="from")
    to: Port = 65535

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.from_ > self.to:
            raise ValueError(f"'from' ({self.from_}) must not be above 'to' ({self.to})")
        return self


class Networking(_Section):
    bond_interface: InterfaceName | None = Field(
        None, description="Cluster interface (usually a bond) EXO's traffic should use."
    )
    extra_interfaces: list[InterfaceName] = Field(
        default_factory=list, description="More cluster interfaces (e.g. Thunderbolt links)."
    )
    backup_interface: InterfaceName | None = Field(
        None, description="Interface to report failover to when the cluster interface is down."
    )
    download_interfaces: list[InterfaceName] = Field(
        default_factory=list,
        description="Interfaces beside the cluster ones the node may use for model downloads.",
    )
    restrict_interfaces: StrictBool = Field(
        True, description="Limit the node unit to loopback and the interfaces named here."
    )
    rdma_enabled: StrictBool = Field(True, description="Use RDMA/Thunderbolt links where present.")
    discovery_port: Port = Field(EXO_DISCOVERY_PORT, description="EXO's UDP discovery port.")
    zenoh_port: Port = Field(EXO_ZENOH_PORT, description="EXO's TCP transport (zenoh) port.")
    ring_ports: PortRange = Field(
        default_factory=lambda: PortRange.model_validate({}),
        description="TCP range EXO's MLX ring/JACCL backends use between nodes.",
    )
    network_namespace: NetnsName | None = Field(
        None, description="Run the EXO units in this named network namespace."
    )

    @property
    def cluster_interfaces(self) -> list[str]:
        first = [self.bond_interface] if self.bond_interface else []
        return first + [i for i in self.extra_interfaces if i not in first]

    @property
    def allowed_interfaces(self) -> list[str] | None:
        """What the node unit's RestrictNetworkInterfaces= allows (None: every interface)."""
        backup = [self.backup_interface] if self.backup_interface else []
        named = [*self.cluster_interfaces, *backup]
        if not named or not self.restrict_interfaces:
            return None
        return list(dict.fromkeys(["lo", *named, *self.download_interfaces]))


GpuMinor = Annotated[StrictInt, Field(ge=0, le=255)]  # /dev/nvidia<minor>


class NodePerGpu(_Section):
    enable: StrictBool = Field(
        False, description="Run one EXO node per GPU group, each in its own network namespace."
    )
    groups: list[list[GpuMinor]] = Field(
        default_factory=list,
        description="The GPUs of each node by NVIDIA device minor (/dev/nvidiaN): [[0], [1]].",
    )
    cpu_fallback: StrictBool = Field(
        False, description="A node whose GPUs are unusable runs on the CPU instead of stopping."
    )
    addresses: list[str] = Field(
        default_factory=list,
        description="Each node's IPv4 address with prefix on the cluster link, in group order "
        "(EXO's API listens on IPv4 only); empty: an IPv4 link-local address per node.",
    )

    @model_validator(mode="after")
    def _groups(self) -> NodePerGpu:
        if self.enable and not self.groups:
            raise ValueError("enable needs groups: the GPU device minors of each node")
        if self.addresses and len(self.addresses) != len(self.groups):
            raise ValueError(
                f"addresses has {len(self.addresses)} entries for {len(self.groups)} groups: "
                "give one per group, or none"
            )
        for text in self.addresses:
            try:
                address = ipaddress.IPv4Interface(text)
            except ValueError:
                raise ValueError(
                    f"addresses: {text!r} is not an IPv4 address with a prefix, e.g. 10.0.0.11/24"
                ) from None
            if address.network.prefixlen == 32 or address.ip == address.network.network_address:
                raise ValueError(f"addresses: {text!r} is not a host address in a network")
        seen: set[int] = set()
        for group in self.groups:
            if not group:
                raise ValueError("a group names no GPU")
            for minor in group:
                if minor in seen:
                    raise ValueError(f"GPU {minor} is in two groups")
                seen.add(minor)
        return self


class Hardware(_Section):
    auto_detect: StrictBool = Field(
        True, description="Choose the accelerator from what is detected."
    )
    preferred_accelerator: Accelerator | None = Field(
        None, description="Use this accelerator when it works here; detection decides otherwise."
    )
    memory_limit: MemoryLimitText | None = Field(
        None, description="Memory EXO may use: '80%' of physical memory or a size like '48G'."
    )
    packages: dict[Accelerator, AbsolutePath] = Field(
        default_factory=dict,
        description="Installed EXO variants: accelerator -> package path holding bin/exo.",
    )
    visible_devices: list[DeviceId] | None = Field(
        None, description="GPU indices or UUIDs EXO may use (CUDA_VISIBLE_DEVICES)."
    )
    rocm_gfx_override: GfxVersion | None = Field(
        None, description="HSA_OVERRIDE_GFX_VERSION for ROCm cards not recognised as-is."
    )
    cuda_minimum_driver: DriverVersion | None = Field(
        None,
        description="Oldest NVIDIA driver the installed CUDA variant runs on; older: CPU.",
    )
    cuda_minimum_compute_capability: ComputeCapability | None = Field(
        None,
        description="Oldest GPU generation the installed CUDA variant runs on; older GPUs: unused.",
    )
    node_per_gpu: NodePerGpu = Field(
        default_factory=lambda: NodePerGpu.model_validate({}),
        description="One EXO node per GPU (group) instead of one node that computes on one GPU.",
    )

    def executable(self, accelerator: Accelerator) -> Path | None:
        package = self.packages.get(accelerator)
        return Path(package) / "bin" / "exo" if package else None


class K3s(_Section):
    integration: StrictBool = Field(False, description="Register this node with a K3s cluster.")
    service_discovery: StrictBool = Field(
        True, description="Keep this node's EndpointSlice entry in step with its health."
    )
    namespace: K8sName = "exo-system"
    service_account: K8sName = "exo"
    service_name: K8sName = "exo-api"
    kubeconfig_file: AbsolutePath | None = None
    token_file: AbsolutePath | None = None
    ca_file: AbsolutePath | None = None
    api_server: Url | None = None
    node_name: K8sSubdomain | None = None
    node_address: IPAddress | None = None
    allowed_namespaces: list[K8sName] = Field(
        default_factory=list, description="Namespaces whose pods may reach EXO (NetworkPolicy)."
    )


class Security(_Section):
    user: UserName = "exo"
    group: UserName = "exo"
    data_dir: AbsolutePath = "/var/lib/exo"
    cache_dir: AbsolutePath = "/var/cache/exo"
    config_dir: AbsolutePath = "/etc/exo"
    runtime_dir: AbsolutePath = "/run/exo"


class KeyPolicy(_Section):
    """Limits of one API key; a limit left out (null) does not apply."""

    requests_per_minute: StrictInt | None = Field(
        None, ge=1, le=1_000_000, description="Requests per minute, in bursts of up to as many."
    )
    concurrency: StrictInt | None = Field(
        None, ge=1, le=65535, description="Requests in flight at once."
    )
    tokens_per_minute: StrictInt | None = Field(
        None,
        ge=1,
        le=1_000_000_000,
        description="Prompt plus completion tokens per minute, as EXO's usage reports them.",
    )
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None,
        description="The models the key may name in a request's 'model' (null: any).",
    )


# the key policy name of every key without an entry of its own
EVERY_KEY = "*"


def _policy_name(value: str) -> str:
    if value == EVERY_KEY:
        return value
    try:
        return check("apiKeyName", value)
    except ValueError as exc:
        raise ValueError(f"{exc} (or '{EVERY_KEY}' for every other key)") from None


KeyPolicies = dict[Annotated[str, AfterValidator(_policy_name)], KeyPolicy]


class Gateway(_Section):
    enable: StrictBool = Field(True, description="Run the gateway (exo-api.service).")
    listen_address: IPAddress = Field(
        "127.0.0.1", description="Address the gateway listens on; non-loopback needs apiKeysFile."
    )
    port: Port = Field(GATEWAY_PORT, description="TCP port the gateway listens on.")
    api_keys_file: AbsolutePath | None = Field(
        None, description="File of API keys, one per line ('name:key' names one); SIGHUP reloads."
    )
    tls_certificate_file: AbsolutePath | None = Field(
        None, description="PEM certificate (chain) to serve HTTPS with; needs tlsKeyFile."
    )
    tls_key_file: AbsolutePath | None = Field(
        None, description="PEM private key of tlsCertificateFile."
    )
    public_paths: list[PublicPath] = Field(
        default_factory=lambda: ["/health"],
        description="Exact request paths served without an API key (e.g. /health, /metrics).",
    )
    static_backends: list[Url] = Field(
        default_factory=list,
        description="EXO node API URLs to use besides the local node and its cluster peers.",
    )
    local_backend: StrictBool = Field(
        True,
        description="Use this host's node API (http://127.0.0.1:apiPort) and learn peers from it.",
    )
    max_body_bytes: StrictInt = Field(
        64 << 20,
        ge=1024,
        le=1 << 30,
        description="Largest request body accepted (the gateway buffers it); larger get 413.",
    )
    connect_timeout_sec: StrictFloat = Field(
        5.0, gt=0, le=600, description="Seconds to connect to a backend before trying another."
    )
    response_timeout_sec: StrictFloat = Field(
        900.0,
        gt=0,
        le=86400,
        description="Seconds a backend may take to start its response before another is tried.",
    )
    header_read_timeout_sec: float = Field(
        10.0,
        ge=0.001,
        le=3600,
        description="Seconds a new client connection may take to send its first request's "
        "headers before it is closed.",
    )
    keep_alive_timeout_sec: float = Field(
        30.0,
        ge=0.001,
        le=3600,
        description="Seconds a client connection may stay idle (or with a request's headers "
        "incomplete) after the previous response before it is closed.",
    )
    stream_idle_timeout_sec: float = Field(
        300.0,
        ge=0.001,
        le=86400,
        description="Seconds a response being passed on may go without data from the backend, "
        "or without the client taking any, before both connections are closed.",
    )
    max_connections_per_address: int = Field(
        256,
        ge=1,
        le=65535,
        description="Client connections open at once from one address; more are closed at once.",
    )

    workers: StrictInt | None = Field(
        None,
        ge=1,
        le=256,
        description="Gateway processes sharing the port (SO_REUSEPORT); null: one per CPU "
        "core the gateway may use, at most 8.",
    )
    key_policies: KeyPolicies = Field(
        default_factory=dict,
        description="Limits by API key name ('*': every key without an entry); policyFile "
        "entries replace these by name.",
    )
    policy_file: AbsolutePath | None = Field(
        None,
        description="JSON file of key policies, shaped like keyPolicies; SIGHUP reloads it.",
    )

    @model_validator(mode="after")
    def _safe(self) -> Gateway:
        if (self.tls_certificate_file is None) != (self.tls_key_file is None):
            raise ValueError("tlsCertificateFile and tlsKeyFile must be set together")
        exposed = not ipaddress.ip_address(self.listen_address).is_loopback
        if not self.local_backend and not self.static_backends and self.enable:
            raise ValueError(
                "localBackend is false and staticBackends is empty: no backend; set "
                "localBackend to true or list staticBackends"
            )
        if (self.key_policies or self.policy_file) and self.api_keys_file is None:
            raise ValueError(
                "keyPolicies and policyFile limit API keys: set apiKeysFile (or remove them)"
            )
        if self.enable and self.api_keys_file is None and exposed:
            raise ValueError(
                f"listenAddress {self.listen_address} without apiKeysFile would expose "
                "EXO unauthenticated: set apiKeysFile or listen on 127.0.0.1"
            )
        return self


class Exporter(_Section):
    enable: StrictBool = Field(
        False, description="Serve the cluster's state as Prometheus metrics (exo-exporter)."
    )
    listen_address: IPAddress = Field(
        "127.0.0.1", description="Address /metrics is served on (loopback unless scraped remotely)."
    )
    port: Port = Field(EXPORTER_PORT, description="TCP port /metrics is served on.")


class HealthCheck(_Section):
    interval_sec: StrictFloat = Field(5.0, gt=0, le=3600)
    timeout_sec: StrictFloat = Field(3.0, gt=0, le=600)
    failures: StrictInt = Field(3, ge=1, le=100, description="Failed probes before 'down'.")


class Sharding(StrEnum):
    """Upstream's ``Sharding`` (src/exo/shared/types/worker/shards.py)."""

    PIPELINE = "Pipeline"
    TENSOR = "Tensor"


class InstanceMeta(StrEnum):
    """Upstream's ``InstanceMeta`` (src/exo/shared/types/worker/instances.py). ``MlxJaccl``
    (RDMA over Thunderbolt) runs on macOS nodes only."""

    MLX_RING = "MlxRing"
    MLX_JACCL = "MlxJaccl"


class DeclaredModel(_Section):
    """One entry of ``models``: a model the cluster keeps downloaded, and maybe running."""

    running: StrictBool = Field(
        True,
        description="Keep one instance running (placed with the parameters below); false: "
        "keep it downloaded only.",
    )
    sharding: Sharding = Field(Sharding.PIPELINE, description="Upstream's placement sharding.")
    instance_meta: InstanceMeta = Field(
        InstanceMeta.MLX_RING, description="Upstream's instance kind (MlxRing on Linux)."
    )
    min_nodes: StrictInt = Field(1, ge=1, le=1024, description="Fewest nodes to place it on.")
    custom: StrictBool = Field(
        False,
        description="Not in EXO's catalogue: add its card from Hugging Face first "
        "(upstream's POST /models/add).",
    )


class ModelReconciler(_Section):
    enable: StrictBool = Field(
        True,
        description="Run exo-models.service where models are declared; it acts only while "
        "its node is the elected master.",
    )
    interval_sec: StrictFloat = Field(
        30.0, gt=0, le=86400, description="Seconds between comparisons once converged."
    )
    place_timeout_sec: StrictFloat = Field(
        900.0,
        gt=0,
        le=86400,
        description="Seconds a placed instance may take to appear and become ready before "
        "it counts as failed (downloads included).",
    )
    repair_cache: StrictBool = Field(
        True, description="Quarantine damaged files of the local model cache before placing."
    )
    quarantine_dir: AbsolutePath | None = Field(
        None, description="Where damaged model files are moved; default dataDir/quarantine."
    )


class Config(_Section):
    schema_version: Literal[1] = Field(description="Version of this contract (required).")
    mode: Mode = Mode.AUTO
    no_worker: StrictBool = Field(
        False, description="Master only: coordinate without running inference (--no-worker)."
    )
    api_port: Port = EXO_API_PORT
    cluster_namespace: ClusterNamespace | None = Field(
        None, description="EXO --namespace; nodes only see peers with the same one."
    )
    log_level: LogLevel = "info"
    offline: StrictBool = False
    models_dir: AbsolutePath | None = Field(
        None, description="Where downloads go (EXO_DEFAULT_MODELS_DIR); default dataDir/models."
    )
    extra_model_dirs: list[AbsolutePath] = Field(default_factory=list)
    read_only_model_dirs: list[AbsolutePath] = Field(default_factory=list)
    extra_args: list[NoNul] = Field(default_factory=list)
    environment_variables: dict[EnvName, NoNul] = Field(default_factory=dict)
    networking: Networking = Field(default_factory=lambda: Networking.model_validate({}))
    hardware: Hardware = Field(default_factory=lambda: Hardware.model_validate({}))
    # Explicit alias: the automatic camelCase of "k3s" would be "k3S".
    k3s: K3s = Field(default_factory=lambda: K3s.model_validate({}), alias="k3s")
    security: Security = Field(default_factory=lambda: Security.model_validate({}))
    gateway: Gateway = Field(default_factory=lambda: Gateway.model_validate({}))
    health_check: HealthCheck = Field(default_factory=lambda: HealthCheck.model_validate({}))
    models: dict[ModelId, DeclaredModel] = Field(
        default_factory=dict, description="Models by EXO model id that the cluster keeps."
    )
    model_reconciler: ModelReconciler = Field(
        default_factory=lambda: ModelReconciler.model_validate({})
    )
    exporter: Exporter = Field(default_factory=lambda: Exporter.model_validate({}))

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.no_worker and self.mode is not Mode.MASTER:
            raise ValueError(
                "noWorker is only meaningful with mode 'master': set mode to 'master' or "
                "remove noWorker"
            )
        tcp = {"apiPort": self.api_port, "networking.zenohPort": self.networking.zenoh_port}
        if self.gateway.enable:
            tcp["gateway.port"] = self.gateway.port
        if self.exporter.enable:
            tcp["exporter.port"] = self.exporter.port
        seen: dict[int, str] = {}
        for name, port in tcp.items():
            if port in seen:
                raise ValueError(
                    f"{name} and {seen[port]} are both TCP port {port}; give each its own port"
                )
            seen[port] = name
        if self.k3s.integration and self.k3s.token_file and not self.k3s.api_server:
            raise ValueError(
                "k3s.tokenFile needs k3s.apiServer, the API server URL "
                "(for example https://10.0.0.1:6443)"
            )
        if self.k3s.kubeconfig_file and self.k3s.token_file:
            raise ValueError("set k3s.kubeconfigFile or k3s.tokenFile, not both")
        custom = [m for m, spec in self.models.items() if spec.custom]
        if self.offline and custom:
            raise ValueError(
                f"models.{json.dumps(custom[0])}.custom fetches the model card from Hugging "
                "Face, which offline forbids: set offline = false or drop custom"
            )
        if self.hardware.node_per_gpu.enable:
            if self.mode is Mode.MASTER:
                raise ValueError(
                    "hardware.nodePerGpu needs mode 'worker' or 'auto': the nodes elect a master"
                )
            if not self.networking.bond_interface:
                raise ValueError(
                    "hardware.nodePerGpu needs networking.bondInterface: each node gets a "
                    "macvlan on it"
                )
            if self.networking.network_namespace:
                raise ValueError(
                    "hardware.nodePerGpu gives each node a network namespace of its own: "
                    "remove networking.networkNamespace"
                )
            # both talk to the node's API on this host's loopback and read its runtime files;
            # with nodePerGpu the nodes live in namespaces of their own
            if self.models and self.model_reconciler.enable:
                raise ValueError(
                    "hardware.nodePerGpu cannot be combined with the model reconciler yet: set "
                    "modelReconciler.enable = false (place models with `exo-nixos models place`)"
                )
            if self.exporter.enable:
                raise ValueError(
                    "hardware.nodePerGpu cannot be combined with exporter.enable yet: scrape "
                    "each node's /state through the gateway instead, or disable the exporter"
                )
        return self

    @property
    def effective_models_dir(self) -> str:
        return self.models_dir or f"{self.security.data_dir}/models"

    @property
    def effective_quarantine_dir(self) -> str:
        return self.model_reconciler.quarantine_dir or f"{self.security.data_dir}/quarantine"

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _path_part(part: int | str) -> str:
    text = str(part)
    if text and text.isprintable() and "." not in text and text.strip() == text:
        return text
    return json.dumps(text)


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None:
            return None
        field = next(
            (f for n, f in model.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return None
        annotation = field.annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return model


def _format_error(error: Any) -> str:
    loc = tuple(error["loc"])
    path = ".".join(_path_part(p) for p in loc) or "(document)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = [f.alias or n for n, f in parent.model_fields.items()] if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        allowed = f" (known keys: {', '.join(sorted(known))})" if known and not hint else ""
        return f"{path}: unknown key{suggestion}{allowed}"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if kind == "missing":
        return f"{path}: required but missing"
    if isinstance(error.get("input"), dict) and kind == "value_error":
        return f"{path}: {message}"
    if kind in {"enum", "literal_error"}:
        # "Input should be 'Pipeline' ..." -> "input should be 'Pipeline' ...": values as written
        message = message[:1].lower() + message[1:]
        return f"{path}: {describe_value(error['input'])} is not allowed; {message}"
    return f"{path}: {describe_value(error['input'])}: {message}"


def parse_config(document: Any) -> Config:
    """Validate a decoded JSON document; raise ConfigError listing every problem."""
    if not isinstance(document, dict):
        raise ConfigError("config: the document must be a JSON object")
    if jsonio.depth(document) > jsonio.MAX_DEPTH:
        raise ConfigError(f"config: nested more than {jsonio.MAX_DEPTH} levels deep")
    version = document.get("schemaVersion")
    if version is None:
        raise ConfigError("schemaVersion: required but missing; this tool reads schemaVersion 1")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(
            f"schemaVersion: {describe_value(version)} must be an integer; this tool reads "
            f"schemaVersion {SCHEMA_VERSION}"
        )
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"schemaVersion: {describe_value(version)} is not supported; this tool reads "
            f"schemaVersion {SCHEMA_VERSION} (upgrade exo-nixos or the module so they match)"
        )
    try:
        return Config.model_validate(document)
    except ValidationError as exc:
        problems = _all_problems(document, exc)
        raise ConfigError(problems[0], problems) from None


def _all_problems(document: dict[str, Any], first: ValidationError) -> list[str]:
    """Every problem in one pass.

    pydantic checks a section's cross-field rules (a model validator) only once its fields
    are valid, and the document's once every section is; so what is in error is dropped
    (falling back to its default) and the rest judged again, until nothing more can be.
    """
    problems: list[str] = []
    errors = first.errors()
    doc = copy.deepcopy(document)
    dropped: set[str] = set()
    for _ in range(8):  # each round drops at least one key; sections nest 3 deep
        new = [e for e in errors if _format_error(e) not in problems]
        # a rule that names a dropped key only speaks of the stand-in default, not the input
        new = [e for e in new if not any(name in e["msg"] for name in dropped)]
        problems += [_format_error(e) for e in new]
        droppable = [e["loc"] for e in new if e["loc"]]
        dropped |= {str(loc[-1]) for loc in droppable}
        if not droppable:
            break
        for loc in droppable:
            _drop(doc, loc)
        try:
            Config.model_validate(doc)
            break
        except ValidationError as exc:
            errors = exc.errors()
    return problems


def _at(doc: Any, loc: tuple[int | str, ...]) -> Any:
    """The value at ``loc`` in ``doc``; None where the path does not lead anywhere."""
    for part in loc:
        found = (isinstance(doc, dict) and part in doc) or (
            isinstance(doc, list) and isinstance(part, int) and part < len(doc)
        )
        if not found:
            return None
        doc = doc[part]
    return doc


def _drop(doc: Any, loc: tuple[int | str, ...]) -> None:
    """Remove the key (the whole list, for a list item) at ``loc``."""
    parent = _at(doc, loc[:-1])
    if isinstance(parent, dict):
        parent.pop(loc[-1], None)
    elif isinstance(parent, list) and len(loc) >= 2:
        _drop(doc, loc[:-1])


def load_config(path: str | Path, name: str | None = None) -> Config:
    """Read and validate a config file; every failure is a one-line ConfigError naming the
    file (or ``name``, where given)."""
    source = Path(path)
    shown = name or str(source)
    if "\0" in str(source):
        raise ConfigError(
            f"--config {describe_value(str(source))}: a path cannot contain a NUL byte"
        )
    try:
        text = read_bounded(source, CONFIG_FILE_LIMIT, streams=True).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: no such config file; on NixOS set services.exo.enable, "
            "elsewhere pass --config FILE"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the config file: {os_reason(exc)}") from None
    try:
        document = jsonio.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{shown}: {exc}") from None
    try:
        return parse_config(document)
    except ConfigError as exc:
        raise ConfigError(f"{shown}: {exc}", [f"{shown}: {p}" for p in exc.problems]) from None


def default_config() -> Config:
    """The config a host gets from ``services.exo.enable = true`` and nothing else."""
    return Config.model_validate({"schemaVersion": SCHEMA_VERSION})


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/exo-nixos/exo-nixos/docs/config.schema.json"
    schema["title"] = "exo-nixos config (services.exo), schemaVersion 1"
    return schema
