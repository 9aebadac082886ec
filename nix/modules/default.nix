# Every exo module: `imports = [ exo-nixos.nixosModules.default ];`
{
  imports = [
    ./exo-service.nix
    ./exo-hardware.nix
    ./exo-networking.nix
    ./exo-k3s.nix
    ./exo-api.nix
    ./exo-models.nix
    ./exo-exporter.nix
    ./exo-resources.nix
  ];
}
