# services.exo.k3s: make EXO reachable in a K3s cluster as `<serviceName>.<namespace>.svc`.
# Static objects go to services.k3s.manifests on server nodes (rendered by the Python tool);
# exo-k3s-registrar.service keeps this node's EndpointSlice in step with its health.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf mkMerge types optional optionals;
  cfg = config.services.exo;
  k3s = cfg.k3s;
  kube = config.services.k3s;
  exoTypes = import ./lib/types.nix { inherit lib; };
  inherit (exoTypes) absolutePath;
  label = exoTypes.k8sName;
  tool = lib.getExe' cfg.toolPackage "exo-nixos";
  hardening = import ./lib/hardening.nix;

  isServer = kube.enable && kube.role == "server";
  hasCredentials = k3s.kubeconfigFile != null || k3s.tokenFile != null;
  registrarWanted = k3s.integration && k3s.serviceDiscovery;
  runRegistrar = registrarWanted && hasCredentials;

  # The gateway is reachable from pods only when it listens beyond loopback; otherwise the
  # Python tool points the Service at EXO's own (unauthenticated) API port.
  gatewayReachable = cfg.gateway.enable && !(import ./lib/loopback.nix cfg.gateway.listenAddress);

  # rendered at build time, by the build platform's tool
  manifests = pkgs.runCommandLocal "exo-k3s-manifests.yaml"
    { nativeBuildInputs = [ pkgs.buildPackages.exo-nixos ]; }
    "exo-nixos k3s render --config ${cfg.configFile} --output $out";

  credentials =
    optional (k3s.kubeconfigFile != null) "k3s-kubeconfig:${k3s.kubeconfigFile}"
    ++ optional (k3s.tokenFile != null) "k3s-token:${k3s.tokenFile}"
    ++ optional (k3s.caFile != null) "k3s-ca:${k3s.caFile}";
in
{
  imports = [ ./exo-service.nix ./exo-api.nix ];

  options.services.exo.k3s = {
    integration = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Make EXO reachable inside the K3s cluster as `<serviceName>.<namespace>.svc`: on a K3s
        server node the static objects (Namespace, ServiceAccount, RBAC, a Service without
        selector, NetworkPolicies) are added to {option}`services.k3s.manifests`, and on every
        EXO node `exo-k3s-registrar.service` registers this node's endpoint.
      '';
    };
    serviceDiscovery = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run the registrar: keep this node's EndpointSlice entry, `ready` only while EXO here is
        healthy, deleted when the registrar stops. `false` leaves only the static objects.
      '';
    };
    namespace = mkOption { type = label; default = "exo-system"; description = "Kubernetes namespace of the EXO objects."; };
    serviceAccount = mkOption { type = label; default = "exo"; description = "ServiceAccount the registrars authenticate as (with `tokenFile`)."; };
    serviceName = mkOption { type = label; default = "exo-api"; description = "Name of the Service pods connect to."; };
    kubeconfigFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/etc/rancher/k3s/k3s.yaml";
      description = ''
        Kubeconfig the registrar uses, handed to it with `LoadCredential=` (never copied to
        the store). K3s' own `/etc/rancher/k3s/k3s.yaml` works on server nodes but is a
        cluster-admin credential; `tokenFile` with the `exo` ServiceAccount is least privilege.
      '';
    };
    tokenFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/run/secrets/exo-k3s-token";
      description = ''
        File holding the ServiceAccount token (the `<serviceAccount>-token` Secret the manifests
        create), used with `apiServer` and `caFile`; re-read when the API server answers 401.
      '';
    };
    caFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/var/lib/rancher/k3s/agent/server-ca.crt";
      description = "CA bundle the API server's certificate is checked against (with `tokenFile`).";
    };
    apiServer = mkOption {
      type = types.nullOr exoTypes.url;
      default = null;
      example = "https://10.0.0.1:6443";
      description = "API server URL, for `tokenFile`.";
    };
    nodeName = mkOption {
      type = types.nullOr exoTypes.k8sSubdomain;
      default = null;
      example = "gpu-01";
      description = "Node name written in the EndpointSlice; `null`: the host name (K3s' default).";
    };
    nodeAddress = mkOption {
      type = types.nullOr exoTypes.ipAddress;
      default = null;
      example = "10.0.0.21";
      description = ''
        Address pods reach this node at; `null`: the first global address of
        {option}`services.exo.networking.bondInterface`, else the default route's source address.
      '';
    };
    allowedNamespaces = mkOption {
      type = types.listOf label;
      default = [ ];
      example = [ "ai-apps" ];
      description = ''
        Namespaces that get a NetworkPolicy allowing their pods egress to EXO's port, for
        namespaces that deny egress by default. EXO runs on the hosts, not in pods, so no
        NetworkPolicy can keep other pods out: that is the gateway's API keys' job (see
        docs/k3s.md).
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      # every option is a key of the contract
      services.exo.configDocument.k3s = k3s;
    }

    (mkIf k3s.integration {
      warnings =
        optional (registrarWanted && !hasCredentials) (
          if kube.enable && kube.role == "agent" then
            "services.exo.k3s: this K3s agent node has no credentials, so exo-k3s-registrar is not started and the node is never added to the ${k3s.serviceName} Service. Copy the ServiceAccount token (kubectl -n ${k3s.namespace} get secret ${k3s.serviceAccount}-token) to a file and set services.exo.k3s.tokenFile, apiServer and caFile."
          else
            "services.exo.k3s: no credentials, so exo-k3s-registrar is not started; set services.exo.k3s.tokenFile (with apiServer and caFile) or services.exo.k3s.kubeconfigFile."
        )
        ++ optional (!gatewayReachable)
          "services.exo.k3s: the ${k3s.serviceName} Service points at EXO's own API port ${toString cfg.apiPort}, which has no authentication, because the gateway is ${if cfg.gateway.enable then "bound to loopback" else "disabled"}; set services.exo.gateway.listenAddress and apiKeysFile to put pods behind the gateway."
        ++ optional (registrarWanted && cfg.networking.networkNamespace != null)
          "services.exo.k3s: EXO runs in network namespace ${cfg.networking.networkNamespace} while exo-k3s-registrar stays in the host's to reach the Kubernetes API, so its health probe of 127.0.0.1 never sees the node and the endpoint stays not ready; set services.exo.k3s.serviceDiscovery = false or drop networking.networkNamespace.";

      services.k3s.manifests = mkIf isServer {
        exo-system.source = manifests;
      };

      systemd.services.exo-k3s-registrar = mkIf runRegistrar {
        description = "Register this EXO node in the K3s Service ${k3s.namespace}/${k3s.serviceName}";
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ] ++ cfg.nodeServices ++ optionals kube.enable [ "k3s.service" ];
        partOf = [ "exo.target" ];
        wantedBy = [ "exo.target" ];
        restartTriggers = [ cfg.configFile ];
        serviceConfig = hardening // {
          ExecStart = "${tool} k3s register --config ${cfg.configFile}";
          LoadCredential = credentials;
          Restart = "always";
          RestartSec = 2;
          RestartSteps = 5;
          RestartMaxDelaySec = 60;
          # The registrar deletes its endpoint on SIGTERM within 10 s.
          TimeoutStopSec = 20;
          DynamicUser = true;
          # Hardening beyond the baseline (lib/hardening.nix): an API client needs no devices.
          PrivateDevices = true;
          # AF_NETLINK: reading the cluster interface's address.
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
          SystemCallFilter = hardening.SystemCallFilter ++ [ "~@resources" ];
        };
      };
    })
  ]);
}
