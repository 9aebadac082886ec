# The module-evaluation tests (tests/test_nix_*.py through tests/nixeval.py, which evaluates
# nix/tests/eval.nix) and the flake's own structural tests (tests/test_flake.py) as a flake
# check: nix-instantiate with this flake's nixpkgs lib, inside the build sandbox with a
# private, empty Nix store, as nixpkgs runs its own lib tests.
{
  pkgs,
  nixpkgs,
  src,
}:
let
  python = pkgs.python3.withPackages (
    ps:
    ps.exo-nixos.pythonDependencies
    ++ [
      ps.pytest
      ps.hypothesis
      ps.pyyaml
    ]
  );
in
pkgs.runCommand "exo-nixos-module-eval"
  {
    nativeBuildInputs = [
      pkgs.nix
      pkgs.ruff # tests/test_flake.py lints the VM test scripts
      python
    ];
    EXO_NIXOS_NIXPKGS_LIB = "${nixpkgs}";
  }
  ''
    cp -r ${src} source
    chmod -R u+w source
    cd source

    export HOME=$TMPDIR/home
    export NIX_STORE_DIR=$TMPDIR/store
    export NIX_STATE_DIR=$TMPDIR/var/nix
    export NIX_LOG_DIR=$TMPDIR/var/log/nix
    export NIX_CONF_DIR=$TMPDIR/etc
    export PYTHONPATH=$PWD/src
    mkdir -p "$HOME"
    nix-store --init

    # Fail rather than skip: here nix-instantiate and nixpkgs' lib must both be found.
    python -c 'import sys; from tests.nixeval import skip_reason; sys.exit(skip_reason())'
    python -m pytest -p no:cacheprovider tests/test_nix_*.py tests/test_flake.py
    touch $out
  ''
