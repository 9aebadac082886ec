# services.exo.binaryCaches: EXO's binary caches in the system's nix.conf. Nix applies a flake's
# nixConfig only to the top-level flake, never to one used as an input (the usual setup), so
# without this every rebuild compiles EXO, MLX and, for the CUDA variant, CUDA from source.
{ config, lib, ... }:
let
  caches = import ../caches.nix;
in
{
  options.services.exo.binaryCaches.enable = lib.mkEnableOption ''
    the binary caches that serve EXO's builds (${lib.concatStringsSep ", " caches.substituters})
    as substituters, with their public keys, in {option}`nix.settings`. Off by default: trusting
    a cache's key is the administrator's decision. Takes effect once this configuration is
    active, so pass the caches to the first build by hand (see the README)'';

  config = lib.mkIf config.services.exo.binaryCaches.enable {
    # list-typed in nixos/modules/config/nix.nix: merged with cache.nixos.org, not replacing it
    nix.settings = { inherit (caches) substituters trusted-public-keys; };
  };
}
