# systemd-networkd options the networking module reads (to check, never to write, the host's
# own link configuration).
{ lib, ... }:
let
  inherit (lib) mkOption types;
  unitValue = types.oneOf [ types.bool types.int types.str types.path ];
  section = mkOption { type = types.attrsOf (types.either unitValue (types.listOf unitValue)); default = { }; };
  # nixos/modules/tasks/network-interfaces.nix: a gateway address, or one with its interface
  gateway = mkOption {
    type = types.nullOr (types.coercedTo types.str (address: { inherit address; }) (types.submodule {
      options = {
        address = mkOption { type = types.str; };
        interface = mkOption { type = types.nullOr types.str; default = null; };
        metric = mkOption { type = types.nullOr types.int; default = null; };
        source = mkOption { type = types.nullOr types.str; default = null; };
      };
    }));
    default = null;
  };
in
{
  options.networking.defaultGateway = gateway;
  options.networking.defaultGateway6 = gateway;
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
