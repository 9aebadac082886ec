# NixOS options the documented examples set besides services.exo.
{ lib, ... }:
{
  # the README's NVIDIA node allows the driver's unfree packages (allowUnfreePredicate);
  # nixos/modules/misc/nixpkgs.nix types it as a nixpkgs config (an attribute set)
  options.nixpkgs.config = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
}
