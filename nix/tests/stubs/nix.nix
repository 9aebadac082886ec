# nix.settings as nixos/modules/config/nix.nix declares the keys the exo modules set: list-typed,
# with the cache.nixos.org substituter (mkAfter) and key that NixOS itself defines.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options.nix.settings = mkOption {
    type = types.submodule {
      freeformType = types.attrsOf types.anything;
      options = {
        substituters = mkOption { type = types.listOf types.str; };
        trusted-public-keys = mkOption { type = types.listOf types.str; };
      };
    };
    default = { };
  };
  config.nix.settings = {
    trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
    substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
  };
}
