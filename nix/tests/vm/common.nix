# What every EXO test VM shares: this flake's modules, EXO on the CPU (a VM has no GPU),
# offline (a test VM has no network: EXO must not try to download models), and the memory
# EXO's Python stack needs to start.
{ self }:
{ pkgs, ... }:
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
    memorySize = 4096;
    cores = 2;
    diskSize = 4096;
  };
}
