# services.exo.k3s: register this node behind a K3s Service.
{ config, lib, ... }:
let
  inherit (lib) mkOption mkIf types;
  cfg = config.services.exo;
  k3s = cfg.k3s;
  label = types.strMatching "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?";
  absolutePath = types.strMatching "/.*";
in
{
  imports = [ ./exo-service.nix ];

  options.services.exo.k3s = {
    integration = mkOption {
      type = types.bool;
      default = false;
      description = "Make EXO reachable inside the K3s cluster as `exo-api.<namespace>.svc`.";
    };
    serviceDiscovery = mkOption {
      type = types.bool;
      default = true;
      description = "Keep this node's EndpointSlice entry ready only while EXO is healthy.";
    };
    namespace = mkOption { type = label; default = "exo-system"; description = "Kubernetes namespace."; };
    serviceAccount = mkOption { type = label; default = "exo"; description = "ServiceAccount of the registrar."; };
    serviceName = mkOption { type = label; default = "exo-api"; description = "Name of the Service."; };
    kubeconfigFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/etc/rancher/k3s/k3s.yaml";
      description = "Kubeconfig the registrar uses (never copied to the store).";
    };
    tokenFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      description = "ServiceAccount token file, used with `apiServer` and `caFile`.";
    };
    caFile = mkOption { type = types.nullOr absolutePath; default = null; description = "CA bundle of the API server."; };
    apiServer = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://10.0.0.1:6443";
      description = "API server URL for `tokenFile`.";
    };
    nodeName = mkOption { type = types.nullOr types.str; default = null; description = "Node name in the EndpointSlice; default the host name."; };
    nodeAddress = mkOption { type = types.nullOr types.str; default = null; description = "Address advertised; default the cluster interface's."; };
    allowedNamespaces = mkOption {
      type = types.listOf label;
      default = [ ];
      example = [ "ai-apps" ];
      description = "Namespaces whose pods may reach EXO (NetworkPolicy); empty: only the EXO namespace.";
    };
  };

  config = mkIf cfg.enable {
    services.exo.configDocument.k3s = {
      inherit (k3s)
        integration serviceDiscovery namespace serviceAccount serviceName kubeconfigFile tokenFile
        caFile apiServer nodeName nodeAddress allowedNamespaces;
    };
  };
}
