# Where each package of this flake exists, and why it does not exist elsewhere. flake.nix
# exposes a package on the systems listed here; the overlay gives every other platform an
# evaluation error that says why, instead of a build that would claim what it cannot do.
let
  linux = [ "x86_64-linux" "aarch64-linux" ];
  darwin = [ "aarch64-darwin" ];
  all = linux ++ darwin;
in
{
  systems = all;

  packages = {
    exo-python = all;
    exo-rust-bindings = all;
    exo-dashboard = all;
    exo-nixos = all;
    exo-complete = all;
    exo-cuda = linux;
    # upstream's flake no longer builds it (see reasons)
    exo-cuda-12 = [ ];
    exo-rocm = linux;
    exo-mlx = darwin;
  };

  reasons = {
    exo-cuda = "upstream EXO builds its CUDA backend for Linux only";
    exo-cuda-12 = "upstream EXO stopped building its CUDA 12 variant after v1.0.71 (exo-cuda-12 is commented out in its python/parts.nix at the pinned commit); use exo-cuda (CUDA 13, NVIDIA driver 580 or newer)";
    exo-rocm = "exo-rocm is the CPU build for AMD-GPU Linux hosts (upstream EXO has no ROCm backend); on macOS use exo-mlx";
    exo-mlx = "exo-mlx is EXO's Apple-silicon (Metal) build; on Linux use exo-complete (CPU) or exo-cuda";
  };
}
