# services.exo.exporter: exo-exporter.service, the cluster's state for Prometheus.
# The exporter itself is `exo-nixos exporter` (src/exo_nixos/monitoring); docs/monitoring.md.
{ config, lib, ... }:
let
  inherit (lib) mkEnableOption mkOption mkIf types optional;
  cfg = config.services.exo;
  ex = cfg.exporter;
  exoTypes = import ./lib/types.nix { inherit lib; };
  exe = lib.getExe' cfg.toolPackage "exo-nixos";
  loopback = import ./lib/loopback.nix ex.listenAddress;
  netns = cfg.networking.networkNamespace;
  networkService = import ./lib/network-service.nix;
in
{
  imports = [ ./exo-service.nix ./exo-networking.nix ];

  options.services.exo.exporter = {
    enable = mkEnableOption ''
      `exo-exporter.service`, which serves the EXO cluster's state (nodes, memory, instances,
      downloads, memory pressure, the accelerator) as Prometheus metrics on `/metrics`
    '';
    listenAddress = mkOption {
      type = exoTypes.ipAddress;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address `/metrics` is served on. The metrics name the cluster's hosts and models but
        no secrets; listen beyond loopback only for a Prometheus on another host.
      '';
    };
    port = mkOption {
      type = types.port;
      default = 52418;
      description = "TCP port `/metrics` is served on.";
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open {option}`services.exo.exporter.port` in the firewall (for a remote Prometheus).";
    };
  };

  config = mkIf (cfg.enable && ex.enable) {
    services.exo.configDocument.exporter = { inherit (ex) enable listenAddress port; };

    warnings = optional (ex.openFirewall && loopback)
      "services.exo.exporter.openFirewall is set but the exporter listens on ${ex.listenAddress} only; set listenAddress (e.g. \"0.0.0.0\") for Prometheus to reach it.";

    networking.firewall.allowedTCPPorts = optional ex.openFirewall ex.port;

    systemd.targets.exo.wants = [ "exo-exporter.service" ];

    systemd.services.exo-exporter = {
      description = "EXO cluster state for Prometheus";
      # it reports the node down too: ordered after it, never bound to it
      after = [ "network.target" ] ++ cfg.nodeServices;
      partOf = [ "exo.target" ];
      wantedBy = [ "exo.target" ];
      serviceConfig = networkService // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${exe} exporter --config ${cfg.configFile}";
        Restart = "on-failure";
        RestartSec = 2;
        # reads what the node unit's user leaves in the runtime and state directories
        User = cfg.security.user;
        Group = cfg.security.group;
        NetworkNamespacePath = mkIf (netns != null) "/run/netns/${netns}";
        # the node unit's cgroup files are read through the read-only /sys/fs/cgroup that
        # ProtectControlGroups leaves
        MemoryMax = "256M";
      };
    };
  };
}
