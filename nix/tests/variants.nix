# Evaluates nix/packages (the overlay body) for one platform with stand-in packages, to test
# what each EXO variant is made of without building anything: which upstream build it wraps
# and what it says it runs on. `available` tells which names evaluate on this platform; the
# others throw with their reason (tested through nix-instantiate's error output).
{ lib, system }:
let
  upstreamPackage = import ./fake-package.nix;
  exo = {
    outPath = "/nix/store/00000000000000000000000000000000-source";
    # what upstream's flake exports at the pinned commit (the names used here)
    packages.${system} = lib.genAttrs [
      "exo"
      "exo-cuda-13"
      "dashboard"
      "exo-rs"
    ] upstreamPackage;
  };
  final = {
    inherit lib;
    stdenv.hostPlatform.system = system;
    # exo-complete.nix is called with these arguments; the test inspects them.
    callPackage = path: args: { calledFile = baseNameOf path; } // args;
    exo-nixos = upstreamPackage "exo-nixos";
    exo-rs = upstreamPackage "exo-rs";
    python3Packages = {
      exo-nixos = upstreamPackage "exo-nixos-lib";
      toPythonApplication = p: p // { application = true; };
    };
  };
  packages = import ../packages { inherit exo; } final { };
  describe =
    value:
    if value ? calledFile then
      {
        inherit (value) calledFile accelerator description;
        pname = value.pname or "exo-complete";
        requestedAccelerator = value.requestedAccelerator or value.accelerator;
        note = value.note or null;
        requirements = value.requirements or { };
        wraps = value.exo.name;
        dashboard = value.dashboard.name;
        inherit (value) resources version;
      }
    else
      { name = value.name; };
  platforms = import ../packages/platforms.nix;
in
{
  available = lib.filter (name: (builtins.tryEval packages.${name}).success) (builtins.attrNames packages);
  names = builtins.attrNames packages;
  expectedHere = lib.filter (name: lib.elem system platforms.packages.${name}) (builtins.attrNames platforms.packages);
  packages = lib.mapAttrs (_: describe) (
    lib.filterAttrs (name: _: (builtins.tryEval packages.${name}).success) packages
  );
}
