# NixOS options the documented examples set besides services.exo.
{ lib, ... }:
{
  options.hardware.nvidia.open = lib.mkOption { type = lib.types.nullOr lib.types.bool; default = null; };
  # the README's NVIDIA node allows the driver's unfree packages (allowUnfreePredicate)
  options.nixpkgs.config = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
}
