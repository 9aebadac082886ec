# What runNixOSTest adds to every node's NixOS configuration, as far as the VM tests use it:
# qemu-vm.nix's sizes (nixos/modules/virtualisation/qemu-vm.nix, disk-size-option.nix) and the
# test network's primary address (nixos/lib/testing/network.nix). Same types and defaults, so
# two definitions at one priority conflict here as they do there.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options = {
    virtualisation.memorySize = mkOption {
      type = types.ints.positive;
      default = 1024;
    };
    virtualisation.cores = mkOption {
      type = types.ints.positive;
      default = 1;
    };
    virtualisation.diskSize = mkOption {
      type = types.either (types.enum [ "auto" ]) types.ints.positive;
      default = 1024;
    };
    networking.primaryIPAddress = mkOption {
      type = types.str;
      default = "";
    };
    # nixos/modules/services/cluster/rancher/default.nix
    services.k3s.extraFlags = mkOption {
      type = types.either types.str (types.listOf types.str);
      default = [ ];
    };
  };
}
