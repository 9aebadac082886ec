# The exo NixOS modules (plus `modules`) evaluated with nixpkgs' lib against the stub NixOS
# options in ./stubs and the stand-in pkgs; no nixpkgs checkout needed, only `lib`.
{
  lib,
  modules ? [ ],
}:
let
  stubDir = ./stubs;
  stubs = map (file: stubDir + "/${file}") (builtins.attrNames (builtins.readDir stubDir));
  pkgs = import ./stub-pkgs.nix { inherit lib; };
in
lib.evalModules {
  modules =
    stubs
    ++ [
      ../modules/default.nix
      { _module.args.pkgs = pkgs; }
    ]
    ++ modules;
}
