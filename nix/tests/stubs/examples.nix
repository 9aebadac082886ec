# NixOS options the documented examples set besides services.exo.
{ lib, ... }:
{
  options.hardware.nvidia.open = lib.mkOption { type = lib.types.nullOr lib.types.bool; default = null; };
}
