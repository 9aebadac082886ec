# services.exo.networking: the cluster interface, EXO's ports and the firewall.
{ config, lib, ... }:
let
  inherit (lib) mkOption mkIf types;
  cfg = config.services.exo;
  net = cfg.networking;
  interfaceName = types.strMatching "[^[:space:]/:]{1,15}";
in
{
  imports = [ ./exo-service.nix ];

  options.services.exo.networking = {
    bondInterface = mkOption {
      type = types.nullOr interfaceName;
      default = null;
      example = "bond0";
      description = ''
        The cluster interface, usually a bond configured elsewhere (systemd-networkd or
        `networking.bonds`). EXO's ports are opened on it alone and the units are restricted
        to it and loopback.
      '';
    };

    extraInterfaces = mkOption {
      type = types.listOf interfaceName;
      default = [ ];
      example = [ "thunderbolt0" ];
      description = "More cluster interfaces, for example Thunderbolt links between nodes.";
    };

    backupInterface = mkOption {
      type = types.nullOr interfaceName;
      default = null;
      description = "Interface the supervisor reports failover to when the cluster link drops.";
    };

    rdmaEnabled = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Load Thunderbolt networking and the RDMA userspace where present. Upstream EXO uses
        RDMA only on macOS; on Linux its traffic stays TCP over these links.
      '';
    };

    discoveryPort = mkOption {
      type = types.port;
      default = 52413;
      description = "EXO's UDP discovery port (IPv6 multicast `ff12::e0a1:de89`).";
    };

    zenohPort = mkOption {
      type = types.port;
      default = 52414;
      description = "EXO's TCP transport (zenoh) port.";
    };

    ringPorts = {
      from = mkOption { type = types.port; default = 49153; description = "First MLX ring port."; };
      to = mkOption { type = types.port; default = 65535; description = "Last MLX ring port."; };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open EXO's ports (discovery, zenoh, API, ring range) to cluster peers: on the cluster
        interfaces when set, on every interface otherwise.
      '';
    };

    networkNamespace = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "exo";
      description = "Run the EXO units inside this named network namespace (`ip netns`).";
    };
  };

  config = mkIf cfg.enable {
    services.exo.configDocument.networking = {
      inherit (net)
        bondInterface extraInterfaces backupInterface rdmaEnabled discoveryPort zenohPort
        ringPorts networkNamespace;
    };
  };
}
