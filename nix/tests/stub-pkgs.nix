# A stand-in for nixpkgs' `pkgs` that evaluates without building anything: packages are
# attribute sets that look like derivations, `formats.json` keeps the value it would write,
# and `runCommand` keeps its environment and command, which tests/nixeval.py builds as stdenv
# would (see its `build`).
{ lib }:
let
  fakePackage = import ./fake-package.nix;
  generated = name: value: fakePackage name // { passthru.generatedValue = value; generatedValue = value; };
  runCommand = name: env: command: fakePackage name // { inherit env command; };
in
lib.fix (self: lib.genAttrs [
  "exo-complete"
  "exo-rocm"
  "exo-mlx"
  "exo-nixos"
  "rdma-core"
  "kmod"
  "coreutils"
  "iproute2"
  "curl" # the VM tests' nodes
  "jq"
] fakePackage
// {
  inherit lib;
  # what nix/packages gives exo-cuda in passthru.variant, the module's source of defaults
  exo-cuda = fakePackage "exo-cuda" // {
    passthru.variant = {
      accelerator = "cuda";
      requirements = {
        nvidiaDriver = "580";
        computeCapability = "7.5";
      };
    };
  };
  stdenv.hostPlatform.system = "x86_64-linux";
  formats.json = _: {
    type = (lib.types.attrsOf lib.types.anything) // { name = "json value"; };
    generate = generated;
  };
  formats.yaml_1_2 = _: {
    type = (lib.types.attrsOf lib.types.anything) // { name = "YAML 1.2 value"; };
    generate = generated;
  };
  # what NixOS' hardware.nvidia.package defaults to (config.boot.kernelPackages.nvidiaPackages.
  # stable, or .dc with hardware.nvidia.datacenter.enable): drivers with the versions
  # pkgs/os-specific/linux/nvidia-x11/default.nix gives them on x86_64-linux in nixos-25.11
  linuxPackages.nvidiaPackages =
    let
      driver = version: fakePackage "nvidia-x11-${version}" // { inherit version; };
      production = driver "580.105.08";
      dc_570 = driver "570.172.08";
    in
    {
      inherit production dc_570;
      stable = production;
      dc = dc_570;
      dc_535 = driver "535.154.05";
      legacy_535 = driver "535.274.02";
    };
  writeText = name: text: generated name text;
  inherit runCommand;
  # nixpkgs: runCommand with preferLocalBuild and allowSubstitutes = false
  runCommandLocal = name: env: runCommand name ({ preferLocalBuild = true; allowSubstitutes = false; } // env);
  # one platform: the build platform's packages are these
  buildPackages = self;
})
