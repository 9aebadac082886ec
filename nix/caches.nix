# The binary caches that serve what this flake builds: exo.cachix.org (upstream EXO's CI pushes
# EXO, MLX and the dashboard there) and cache.nixos-cuda.org (nixpkgs' CUDA packages, which the
# CUDA variant uses). Read by services.exo.binaryCaches; flake.nix's nixConfig and the CI
# workflow must say the same (tests/test_flake.py checks), as Nix reads those two literally.
{
  substituters = [
    "https://exo.cachix.org"
    "https://cache.nixos-cuda.org"
  ];
  trusted-public-keys = [
    "exo.cachix.org-1:okq7hl624TBeAR3kV+g39dUFSiaZgLRkLsFBCuJ2NZI="
    "cache.nixos-cuda.org:74DUi4Ye579gUqzH4ziL9IyiJBlDpMRn9MBN8oNan9M="
  ];
}
