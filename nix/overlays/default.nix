# Everything this flake adds to pkgs: the Python and Rust overrides, then EXO under the names
# the NixOS modules use (exo-complete, exo-cuda, exo-rocm, exo-mlx, ...) and exo-nixos.
{ exo }:
final: prev:
prev.lib.composeManyExtensions [
  (import ./python-overrides.nix)
  (import ./rust-overrides.nix { inherit exo; })
  (import ../packages { inherit exo; })
] final prev
