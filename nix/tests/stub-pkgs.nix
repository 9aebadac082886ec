# A stand-in for nixpkgs' `pkgs` that evaluates without building anything: packages are
# attribute sets that look like derivations, `formats.json` keeps the value it would write.
{ lib }:
let
  fakePackage = import ./fake-package.nix;
  generated = name: value: fakePackage name // { passthru.generatedValue = value; generatedValue = value; };
in
lib.genAttrs [
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
  writeText = name: text: generated name text;
  runCommand = name: env: command: fakePackage name // { inherit env command; };
}
