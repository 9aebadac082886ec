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
    exo-cuda-12 = linux;
    exo-rocm = linux;
    exo-mlx = darwin;
  };

  reasons = {
    exo-cuda = "upstream EXO builds its CUDA backend for Linux only";
    exo-cuda-12 = "upstream EXO builds its CUDA backend for Linux only";
    exo-rocm = "exo-rocm is the CPU build for AMD-GPU Linux hosts (upstream EXO has no ROCm backend); on macOS use exo-mlx";
    exo-mlx = "exo-mlx is EXO's Apple-silicon (Metal) build; on Linux use exo-complete (CPU) or exo-cuda";
  };
}
