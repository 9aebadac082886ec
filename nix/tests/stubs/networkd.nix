# systemd-networkd options the networking module reads (to check, never to write, the host's
# own link configuration).
{ lib, ... }:
let
  inherit (lib) mkOption types;
  unitValue = types.oneOf [ types.bool types.int types.str types.path ];
  section = mkOption { type = types.attrsOf (types.either unitValue (types.listOf unitValue)); default = { }; };
in
{
  options.systemd.network.networks = mkOption {
    type = types.attrsOf (types.submodule {
      options = {
        matchConfig = section;
        networkConfig = section;
      };
    });
    default = { };
  };
}
