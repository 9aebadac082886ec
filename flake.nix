{
  description = "Run EXO distributed AI inference on NixOS: packages, overlays, NixOS modules (services.exo) and VM tests";

  inputs = {
    # The same branch and revision upstream EXO locks at the pinned commit (see docs/flake.md).
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

    # EXO itself, built by upstream's own flake, pinned to the commit exo-nixos is written for:
    # v1.0.71 + 44 commits, with the zenoh transport (TCP 52414) and IPv6 multicast discovery
    # (UDP 52413) behind `--zenoh-port`, `--discovery-port` and `--namespace`; v1.0.71 itself
    # still runs libp2p and rejects those flags. Its inputs keep upstream's pins (no
    # `follows`), so the build is the one exo.cachix.org serves. See docs/flake.md.
    exo.url = "github:exo-explore/exo/b5375f8cee4368d09e1ce96a56b9f81fb0bc81aa";
  };

  nixConfig = {
    extra-substituters = "https://exo.cachix.org https://cache.nixos-cuda.org";
    extra-trusted-public-keys = "exo.cachix.org-1:okq7hl624TBeAR3kV+g39dUFSiaZgLRkLsFBCuJ2NZI= cache.nixos-cuda.org:74DUi4Ye579gUqzH4ziL9IyiJBlDpMRn9MBN8oNan9M=";
  };

  outputs =
    {
      self,
      nixpkgs,
      exo,
    }:
    let
      inherit (nixpkgs) lib;
      platforms = import ./nix/packages/platforms.nix;
      forAllSystems = lib.genAttrs platforms.systems;
      isLinux = lib.hasSuffix "-linux";

      # nixpkgs with this flake's overlay: the packages below are exactly what the overlay adds.
      pkgsFor = system: nixpkgs.legacyPackages.${system}.extend self.overlays.default;

      # The package names a system has; they depend on the system name only, never on pkgs.
      packageNames =
        system: lib.filter (name: lib.elem system platforms.packages.${name}) (lib.attrNames platforms.packages);

      # services.exo.package and toolPackage default to this flake's builds, so the modules
      # work with any nixpkgs, also with a read-only `nixpkgs.pkgs`, without the overlay. The
      # key makes the module system include it once however many of our modules are imported.
      packageDefaults = {
        key = "exo-nixos#package-defaults";
        _file = "${toString ./flake.nix}#package-defaults";
        imports = [
          (
            { lib, pkgs, ... }:
            let
              system = pkgs.stdenv.hostPlatform.system;
              own =
                self.packages.${system}
                  or (throw "exo-nixos: no packages for ${system}; supported: ${lib.concatStringsSep ", " platforms.systems}");
            in
            {
              services.exo.package = lib.mkDefault own.exo-complete;
              services.exo.toolPackage = lib.mkDefault own.exo-nixos;
            }
          )
        ];
      };
      module = name: file: {
        _file = "${toString ./flake.nix}#nixosModules.${name}";
        imports = [
          file
          packageDefaults
        ];
      };
    in
    {
      overlays = {
        python-overrides = import ./nix/overlays/python-overrides.nix;
        rust-overrides = import ./nix/overlays/rust-overrides.nix { inherit exo; };
        default = import ./nix/overlays/default.nix { inherit exo; };
      };

      packages = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
        in
        lib.genAttrs (packageNames system) (name: pkgs.${name}) // { default = pkgs.exo-complete; }
      );

      nixosModules = {
        default = module "default" ./nix/modules/default.nix;
        exo-service = module "exo-service" ./nix/modules/exo-service.nix;
        exo-hardware = module "exo-hardware" ./nix/modules/exo-hardware.nix;
        exo-networking = module "exo-networking" ./nix/modules/exo-networking.nix;
        exo-k3s = module "exo-k3s" ./nix/modules/exo-k3s.nix;
        exo-api = module "exo-api" ./nix/modules/exo-api.nix;
      };

      checks = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
          vmTest = file: pkgs.testers.runNixOSTest (import file { inherit self; });
        in
        {
          module-eval = import ./nix/tests/module-eval.nix {
            inherit pkgs nixpkgs;
            src = self;
          };
          exo-nixos = self.packages.${system}.exo-nixos;
        }
        // lib.optionalAttrs (isLinux system) {
          vm-single-node = vmTest ./nix/tests/vm/single-node.nix;
          vm-two-node = vmTest ./nix/tests/vm/two-node.nix;
          vm-k3s = vmTest ./nix/tests/vm/k3s.nix;
          vm-netns = vmTest ./nix/tests/vm/netns.nix;
        }
      );

      devShells = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
          python = pkgs.python3.withPackages (
            ps:
            ps.exo-nixos.pythonDependencies
            ++ [
              ps.pytest
              ps.hypothesis
              ps.trustme
              ps.mypy
              ps.types-pyyaml
            ]
          );
        in
        {
          default = pkgs.mkShell {
            packages = [
              python
              pkgs.ruff
              pkgs.nixfmt-tree
            ]
            # systemd-analyze for unit checks, ip for the network tests: Linux only
            ++ lib.optionals (isLinux system) [
              pkgs.iproute2
              pkgs.systemd
            ];
            # tests/nixeval.py evaluates the modules with this nixpkgs' lib.
            EXO_NIXOS_NIXPKGS_LIB = "${nixpkgs}";
          };
        }
      );

      formatter = forAllSystems (system: nixpkgs.legacyPackages.${system}.nixfmt-tree);

      apps = forAllSystems (system: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${system}.exo-complete;
          meta.description = "Run an EXO node (exo-complete)";
        };
        exo-nixos = {
          type = "app";
          program = lib.getExe self.packages.${system}.exo-nixos;
          meta.description = "The exo-nixos tool: doctor, pre-flight, health, status";
        };
      });
    };
}
