# Evaluates flake.nix's `outputs` function with stand-in inputs, so its shape can be tested
# without fetching nixpkgs or EXO: the attribute names of every output (they depend on the
# system names only, never on package contents), and the flake's NixOS modules through the
# module-evaluation harness (nix/tests/eval.nix) with stand-in packages.
{ lib, system ? "x86_64-linux" }:
let
  flake = import ../../flake.nix;
  unavailable = what: throw "flake-outputs.nix: ${what} is a stand-in; nothing is built here";

  stubPackage = import ./fake-package.nix;

  inputs = {
    self = outputs // {
      outPath = toString ../..;
      # The flake's packages stand in as named fakes; the module glue takes its defaults here.
      packages = lib.genAttrs (builtins.attrNames outputs.packages) (
        s: lib.genAttrs (builtins.attrNames outputs.packages.${s}) (name: stubPackage "${name}-${s}")
      );
    };
    nixpkgs = {
      inherit lib;
      outPath = unavailable "nixpkgs' source";
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" ] (
        s: unavailable "nixpkgs.legacyPackages.${s}"
      );
    };
    exo = {
      outPath = unavailable "EXO's source";
      packages = { };
    };
  };
  outputs = flake.outputs inputs;

  names = builtins.attrNames;
  perSystem = attrs: lib.mapAttrs (_: names) attrs;

  moduleEval =
    modules:
    import ./eval.nix {
      inherit lib;
      modules = modules ++ [
        {
          # the harness' stand-in pkgs, plus the platform the glue reads
          _module.args.pkgs = lib.mkForce (
            import ./stub-pkgs.nix { inherit lib; } // { stdenv.hostPlatform.system = system; }
          );
        }
      ];
    };
in
{
  outputs = names outputs;
  inputNames = names flake.inputs;
  inputUrls = lib.mapAttrs (_: input: input.url) flake.inputs;
  nixConfig = flake.nixConfig;
  description = flake.description;
  packages = perSystem outputs.packages;
  checks = perSystem outputs.checks;
  devShells = perSystem outputs.devShells;
  apps = perSystem outputs.apps;
  formatter = names outputs.formatter;
  overlays = names outputs.overlays;
  nixosModules = names outputs.nixosModules;
  appPrograms = lib.mapAttrs (_: apps: lib.mapAttrs (_: app: app.program) apps) outputs.apps;

  # every module of the flake on its own, and two of them together (the glue must merge once)
  modules = lib.mapAttrs (
    _: module:
    (moduleEval [
      module
      { services.exo.enable = true; }
    ]).exo.configDocument
  ) outputs.nixosModules;
  combined =
    (moduleEval [
      outputs.nixosModules.exo-k3s
      outputs.nixosModules.default
      outputs.nixosModules.exo-api
      { services.exo.enable = true; }
    ]).systemPackages;
  stubPackages = lib.mapAttrs (_: p: p.outPath) inputs.self.packages.${system};
}
