# services.exo.networking: the cluster interface, EXO's ports and the firewall, the
# prerequisites of EXO's discovery (IPv6, link-local, multicast), Thunderbolt networking and
# the RDMA userspace, socket buffers for fast links, and an optional network namespace.
# Link state at run time is the supervisor's job (exo-nixos, netlink), not this module's.
{ config, options, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf mkMerge mkDefault types optional optionals;
  cfg = config.services.exo;
  net = cfg.networking;
  exoTypes = import ./lib/types.nix { inherit lib; };
  inherit (exoTypes) interfaceName;
  nodeUnit = cfg.nodeUnit;

  # The interfaces EXO's traffic may use: the cluster interface(s) and, for failover, the
  # backup. Empty means "not configured": the firewall then opens ports globally and the
  # units are not restricted.
  clusterInterfaces = lib.unique
    (optional (net.bondInterface != null) net.bondInterface ++ net.extraInterfaces);
  allowedInterfaces = lib.unique
    (clusterInterfaces ++ optional (net.backupInterface != null) net.backupInterface);
  restricted = allowedInterfaces != [ ];
  # The default gateways' interfaces NixOS configures statically (where the module can know
  # the route); with downloads on, the node unit must be allowed one of them.
  gatewayInterfaces = lib.unique (lib.filter (i: i != null)
    (map (g: if g == null then null else g.interface or null)
      [ config.networking.defaultGateway config.networking.defaultGateway6 ]));
  downloadsCutOff = !cfg.offline && restricted && net.restrictInterfaces
    && net.networkNamespace == null && gatewayInterfaces != [ ]
    && !lib.any (i: lib.elem i (allowedInterfaces ++ net.downloadInterfaces)) gatewayInterfaces;

  # A coordinator (mode master + noWorker) runs no inference, so no MLX ring traffic.
  runsInference = !(cfg.mode == "master" && cfg.noWorker);
  firewallRules = {
    allowedUDPPorts = [ net.discoveryPort ];
    allowedTCPPorts = [ net.zenohPort cfg.apiPort ];
    allowedTCPPortRanges = optional runsInference { inherit (net.ringPorts) from to; };
  };

  # sysctl.d keys: with a "/" first separator the dots in a name like eth0.100 stay intact.
  ipv6Key = iface: "net/ipv6/conf/${iface}/disable_ipv6";
  # escaped as systemd names device units (and NixOS' utils.escapeSystemdPath does): an
  # interface name may hold any character but "/", ":" and whitespace
  deviceUnit = iface:
    "sys-subsystem-net-devices-${lib.strings.escapeC (lib.stringToCharacters "!\"#$%&'()*+,;<=>=@[\\]^`{|}~-") iface}.device";

  # systemd-networkd .network files of the host that match a cluster interface by name and
  # turn IPv6 link-local addressing off: EXO's discovery could not work there.
  linkLocalOff = lib.filterAttrs (
    _: n:
    lib.any (networkd.matchesName (n.matchConfig.Name or [ ])) allowedInterfaces
    && networkd.ipv6LinkLocalOff (n.networkConfig.LinkLocalAddressing or null)
  ) config.systemd.network.networks;

  netnsPath = "/run/netns/${net.networkNamespace}";
  ip = lib.getExe' pkgs.iproute2 "ip";
  networkd = import ./lib/networkd.nix { inherit lib; };
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

    downloadInterfaces = mkOption {
      type = types.listOf interfaceName;
      default = [ ];
      example = [ "eno1" ];
      description = ''
        Interfaces besides the cluster ones that the EXO node unit may use, for model downloads:
        the one holding the default route when that is not the cluster interface (a private
        cluster bond plus an uplink). Only widens {option}`services.exo.networking.restrictInterfaces`;
        no firewall port is opened on them, though EXO may announce itself there too.
      '';
    };

    rdmaEnabled = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Load Thunderbolt networking (`thunderbolt`, `thunderbolt_net`) and the RDMA userspace
        (`ib_uverbs`, `rdma_ucm`, `rdma-core`). Upstream EXO uses RDMA only on macOS; on Linux
        its traffic stays TCP/IP over these links (Thunderbolt, RoCE or IPoIB interfaces).
        Device access for the unit: {option}`services.exo.networking.rdmaDeviceAccess`.
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
      type = types.nullOr exoTypes.netnsName;
      default = null;
      example = "exo";
      description = ''
        Run the EXO node unit inside this named network namespace (`/run/netns/<name>`,
        created by `exo-netns.service` unless it exists). The namespace starts with loopback
        only: move or create the cluster interface in it (a macvlan or veth from your network
        configuration). The host firewall does not apply inside it.
      '';
    };

    rdmaDeviceAccess = mkOption {
      type = types.bool;
      default = false;
      description = ''
        With {option}`services.exo.networking.rdmaEnabled`, let the EXO node unit open the
        RDMA devices (`/dev/infiniband/uverbs*`, `rdma_cm`), see them (no private `/dev`) and
        pin memory (`LimitMEMLOCK=infinity`). Off by default: upstream EXO does not use RDMA
        verbs on Linux (its RDMA path is macOS-only), so the unit needs no such access.
      '';
    };

    restrictInterfaces = mkOption {
      type = types.bool;
      default = true;
      description = ''
        With a cluster interface configured, restrict the EXO node unit to the cluster
        interfaces, the backup interface and loopback (`RestrictNetworkInterfaces`). EXO itself
        would otherwise announce itself on every interface with an IPv6 address.
      '';
    };

    socketBufferSize = mkOption {
      type = types.nullOr (types.ints.between 212992 2147483647);
      default = 67108864;
      example = 134217728;
      description = ''
        Largest socket buffer in bytes (`net.core.rmem_max`/`wmem_max` and the TCP
        autotuning maximum) so one TCP stream can fill a 10-100 Gb/s or Thunderbolt link.
        Set with `mkDefault` priority; `null` leaves the kernel's defaults.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      # every option is a key of the contract but those only this module uses
      services.exo.configDocument.networking =
        removeAttrs net [ "openFirewall" "rdmaDeviceAccess" "socketBufferSize" "rdmaEnabled" ]
      # only when set: the tool warns about RDMA hardware a host lacks only if it was asked for
      // lib.optionalAttrs (options.services.exo.networking.rdmaEnabled.highestPrio < 1500) {
        inherit (net) rdmaEnabled;
      };

      assertions = [
        {
          assertion = config.networking.enableIPv6;
          message = ''
            services.exo needs IPv6: EXO's discovery uses IPv6 multicast (ff12::e0a1:de89) on
            link-local addresses. Set networking.enableIPv6 = true.'';
        }
        {
          assertion = linkLocalOff == { };
          message = ''
            ${lib.concatMapStringsSep ", " (n: "systemd.network.networks.${n}") (builtins.attrNames linkLocalOff)} turns IPv6 link-local addressing off on an EXO cluster interface; EXO's discovery needs it. Set networkConfig.LinkLocalAddressing = "ipv6" (or "yes") there.'';
        }
      ];

      warnings =
        optional (net.openFirewall && net.networkNamespace != null) ''
          services.exo.networking.openFirewall opens ports in the host's firewall, which does
          not apply inside the network namespace "${net.networkNamespace}" the node runs in.''
        ++ optional (net.backupInterface != null && builtins.elem net.backupInterface clusterInterfaces) ''
          services.exo.networking.backupInterface ${net.backupInterface} is also a cluster
          interface; failover to it changes nothing. Name a separate link.''
        ++ optional downloadsCutOff ''
          services.exo: model downloads are on, but the default route is on ${lib.concatStringsSep ", " gatewayInterfaces}, which the node unit may not use (RestrictNetworkInterfaces allows only lo, ${lib.concatStringsSep ", " allowedInterfaces}), so EXO cannot reach the model hub. Set services.exo.networking.downloadInterfaces = [ "${builtins.head gatewayInterfaces}" ], or services.exo.offline = true to serve local models only.'';

      # IPv6 on the cluster links; applied when each interface appears (systemd-sysctl runs
      # from udev for new network devices), so bonds created later by networkd get it too.
      boot.kernel.sysctl = mkMerge [
        (lib.genAttrs (map ipv6Key allowedInterfaces) (_: mkDefault 0))
        (mkIf (net.socketBufferSize != null) (
          let size = toString net.socketBufferSize; in {
            "net.core.rmem_max" = mkDefault net.socketBufferSize;
            "net.core.wmem_max" = mkDefault net.socketBufferSize;
            "net.ipv4.tcp_rmem" = mkDefault "4096 131072 ${size}";
            "net.ipv4.tcp_wmem" = mkDefault "4096 16384 ${size}";
          }))
      ];
    }

    (mkIf net.openFirewall {
      # Only the structure below `networking.firewall` may depend on the config.
      networking.firewall =
        if restricted
        then { interfaces = lib.genAttrs allowedInterfaces (_: firewallRules); }
        else firewallRules;
    })

    (mkIf restricted {
      systemd.services.${nodeUnit} = {
        # Wait for the links to exist (a bond from networkd may come after network-online).
        # Links inside a network namespace have no device units in the host's systemd.
        wants = optionals (net.networkNamespace == null) (map deviceUnit allowedInterfaces);
        after = optionals (net.networkNamespace == null) (map deviceUnit allowedInterfaces);
        serviceConfig.RestrictNetworkInterfaces =
          mkIf net.restrictInterfaces (lib.unique ([ "lo" ] ++ allowedInterfaces ++ net.downloadInterfaces));
      };
    })

    (mkIf net.rdmaEnabled {
      boot.kernelModules = [ "thunderbolt" "thunderbolt_net" "ib_uverbs" "rdma_ucm" ];
      environment.systemPackages = [ pkgs.rdma-core ];
    })

    (mkIf (net.rdmaEnabled && net.rdmaDeviceAccess) {
      systemd.services.${nodeUnit}.serviceConfig = {
        # /dev/infiniband/uverbsN (char major "infiniband_verbs") and the RDMA CM node, added
        # to the allow-list of the hardening's DevicePolicy=closed.
        DeviceAllow = [ "char-infiniband_verbs rw" "/dev/infiniband/rdma_cm rw" ];
        # A private /dev would hide /dev/infiniband; above mkDefault, below a host's setting.
        PrivateDevices = lib.mkOverride 900 false;
        # verbs pin the memory they register
        LimitMEMLOCK = mkDefault "infinity";
      };
    })

    (mkIf (net.networkNamespace != null) {
      systemd.services.exo-netns = {
        description = "Network namespace ${net.networkNamespace} for EXO";
        before = [ "${nodeUnit}.service" ];
        # A switch that only changes this unit must not touch the namespace: EXO runs in it and
        # an admin may have moved links into it. Nothing here deletes it (`ip netns delete`).
        restartIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = [
            # "-": the namespace may exist already (made by an admin, or by an earlier boot's
            # unit); the next line then brings its loopback up all the same, and fails if the
            # namespace is really not there.
            "-${ip} netns add ${net.networkNamespace}"
            # A new namespace has lo DOWN: EXO's API and the supervisor's probe use 127.0.0.1.
            "${ip} -n ${net.networkNamespace} link set lo up"
          ];
          # `ip netns add` bind-mounts the namespace under /run/netns on the host's mount table,
          # so nothing that gives the unit a mount namespace of its own (ProtectSystem,
          # PrivateTmp, ProtectKernelModules, ...) can be used; the rest is locked down.
          CapabilityBoundingSet = [
            "CAP_SYS_ADMIN"
            "CAP_NET_ADMIN"
          ];
          NoNewPrivileges = true;
          # `ip -n NAME` enters the namespace and unshares a mount namespace of its own for /sys
          RestrictNamespaces = "net mnt";
          RestrictAddressFamilies = [
            "AF_NETLINK"
            "AF_UNIX"
          ];
          IPAddressDeny = "any";
          DevicePolicy = "closed";
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "@mount"
            "setns"
            "unshare"
          ];
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          ProtectClock = true;
          ProtectHostname = true;
          PrivateUsers = false;
          RemoveIPC = true;
          UMask = "0077";
        };
      };
      systemd.services.${nodeUnit} = {
        requires = [ "exo-netns.service" ];
        after = [ "exo-netns.service" ];
        serviceConfig.NetworkNamespacePath = netnsPath;
      };
    })
  ]);
}
