# What every EXO test VM shares: this flake's modules, EXO on the CPU (a VM has no GPU),
# offline (a test VM has no network: EXO must not try to download models), and the memory
# EXO's Python stack needs to start.
{ self }:
{ lib, pkgs, ... }:
{
  imports = [ self.nixosModules.default ];

  services.exo = {
    enable = true;
    offline = true;
    hardware.autoDetect = false;
    hardware.preferredAccelerator = "cpu";
  };

  environment.systemPackages = [
    pkgs.curl
    pkgs.jq
  ];

  virtualisation = {
    # defaults: a test that needs more (k3s.nix) sets its own
    memorySize = lib.mkDefault 4096;
    cores = 2;
    diskSize = lib.mkDefault 4096;
  };
}
