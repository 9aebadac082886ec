# Declarations of the NixOS options the exo modules set, with the types (and so the merge
# behaviour) nixpkgs gives them. Only what the module tests need; not a NixOS replacement.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  unitValue = types.oneOf [ types.bool types.int types.str types.path types.package ];
  unitOption = types.either unitValue (types.listOf unitValue);
  unitNames = mkOption { type = types.listOf types.str; default = [ ]; };
  unitCommon = {
    enable = mkOption { type = types.bool; default = true; };
    description = mkOption { type = types.str; default = ""; };
    after = unitNames;
    before = unitNames;
    wants = unitNames;
    requires = unitNames;
    bindsTo = unitNames;
    partOf = unitNames;
    upholds = unitNames;
    conflicts = unitNames;
    wantedBy = unitNames;
    requiredBy = unitNames;
    unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
  };
  service = types.submodule {
    options = unitCommon // {
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
      };
      path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
      script = mkOption { type = types.lines; default = ""; };
      preStart = mkOption { type = types.lines; default = ""; };
      postStart = mkOption { type = types.lines; default = ""; };
      startLimitIntervalSec = mkOption { type = types.nullOr types.int; default = null; };
      startLimitBurst = mkOption { type = types.nullOr types.int; default = null; };
      restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      reloadTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
    };
  };
  target = types.submodule { options = unitCommon; };
  portRange = types.submodule {
    options = {
      from = mkOption { type = types.port; };
      to = mkOption { type = types.port; };
    };
  };
  firewallRules = {
    allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    allowedTCPPortRanges = mkOption { type = types.listOf portRange; default = [ ]; };
    allowedUDPPortRanges = mkOption { type = types.listOf portRange; default = [ ]; };
  };
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };

    systemd.services = mkOption { type = types.attrsOf service; default = { }; };
    systemd.targets = mkOption { type = types.attrsOf target; default = { }; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    systemd.tmpfiles.settings = mkOption { type = types.attrsOf types.anything; default = { }; };
    systemd.network.enable = mkOption { type = types.bool; default = false; };

    users.users = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          isSystemUser = mkOption { type = types.bool; default = false; };
          isNormalUser = mkOption { type = types.bool; default = false; };
          group = mkOption { type = types.str; default = ""; };
          extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
          home = mkOption { type = types.str; default = "/var/empty"; };
          homeMode = mkOption { type = types.strMatching "[0-7]{1,5}"; default = "700"; };
          createHome = mkOption { type = types.bool; default = false; };
          description = mkOption { type = types.str; default = ""; };
          uid = mkOption { type = types.nullOr types.int; default = null; };
        };
      });
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule {
        options.gid = mkOption { type = types.nullOr types.int; default = null; };
        options.members = mkOption { type = types.listOf types.str; default = [ ]; };
      });
      default = { };
    };

    environment.etc = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          source = mkOption { type = types.unspecified; default = null; };
          text = mkOption { type = types.nullOr types.lines; default = null; };
          mode = mkOption { type = types.str; default = "symlink"; };
          user = mkOption { type = types.str; default = "+0"; };
          group = mkOption { type = types.str; default = "+0"; };
        };
      });
      default = { };
    };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    networking.hostName = mkOption { type = types.str; default = "exo-node"; };
    networking.enableIPv6 = mkOption { type = types.bool; default = true; };
    networking.useNetworkd = mkOption { type = types.bool; default = false; };
    networking.firewall = firewallRules // {
      enable = mkOption { type = types.bool; default = true; };
      interfaces = mkOption { type = types.attrsOf (types.submodule { options = firewallRules; }); default = { }; };
    };

    boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    boot.kernel.sysctl = mkOption { type = types.attrsOf types.anything; default = { }; };

    services.udev.extraRules = mkOption { type = types.lines; default = ""; };
    services.xserver.videoDrivers = mkOption { type = types.listOf types.str; default = [ ]; };
    hardware.graphics.enable = mkOption { type = types.bool; default = false; };
    hardware.nvidia.package = mkOption { type = types.nullOr types.package; default = null; };
    hardware.nvidia.datacenter.enable = mkOption { type = types.bool; default = false; };
    hardware.nvidia.nvidiaPersistenced = mkOption { type = types.bool; default = false; };

    services.k3s = {
      enable = mkOption { type = types.bool; default = false; };
      role = mkOption { type = types.enum [ "server" "agent" ]; default = "server"; };
      serverAddr = mkOption { type = types.str; default = ""; };
      manifests = mkOption {
        type = types.attrsOf (types.submodule {
          options = {
            enable = mkOption { type = types.bool; default = true; };
            target = mkOption { type = types.nullOr types.str; default = null; };
            content = mkOption { type = types.nullOr types.unspecified; default = null; };
            source = mkOption { type = types.nullOr types.unspecified; default = null; };
          };
        });
        default = { };
      };
    };
  };
}
