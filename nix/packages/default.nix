# Every package of this flake, as an overlay body over the final package set. EXO itself is
# upstream's own build (its flake, pinned in flake.lock: uv2nix from upstream's uv.lock, the
# Rust bindings with crane, the dashboard with dream2nix); this file maps those builds to the
# names the NixOS modules use and adds what a node needs on top: one wrapper per accelerator
# (exo-complete and its variants) and the exo-nixos tool.
{ exo }:
final: _prev:
let
  inherit (final) lib;
  system = final.stdenv.hostPlatform.system;
  platforms = import ./platforms.nix;

  # The EXO commit pinned in flake.nix and flake.lock: the last release tag it contains and
  # the commit date (UTC). Upstream's own pyproject.toml version (0.3.70) is not EXO's release
  # number, so it is not used. tests/test_flake.py checks this against flake.lock.
  version = "1.0.71-unstable-2026-06-22";

  upstream =
    exo.packages.${system}
      or (throw "exo-nixos: upstream EXO has no packages for ${system}; supported: ${lib.concatStringsSep ", " platforms.systems}");

  resources = "${exo}/resources";

  # One of upstream's package outputs, or an evaluation error that says the pinned commit
  # lacks it (instead of a missing-attribute error from deep inside the overlay).
  build =
    name:
    upstream.${name}
      or (throw "exo-nixos: upstream EXO ${version} (flake.lock) exports no packages.${system}.${name}; see docs/flake.md");

  complete =
    args:
    final.callPackage ./exo-complete.nix (
      {
        inherit version resources;
        dashboard = upstream.dashboard;
        exo-nixos = final.exo-nixos;
      }
      // args
    );

  available = name: lib.elem system platforms.packages.${name};

  guard =
    name: value:
    if available name then
      value
    else
      throw "${name} is not available on ${system}: ${platforms.reasons.${name} or "see docs/flake.md"}";

  isDarwin = lib.hasSuffix "-darwin" system;
in
lib.mapAttrs guard {
  # The Python application: upstream's `exo` (Python 3.13 virtualenv from uv.lock, MLX CPU
  # backend on Linux, MLX Metal on macOS).
  exo-python = build "exo";

  # The Rust extension (upstream's `exo-rs`, Python module exo_rs) as upstream builds it: a
  # wheel, crane + maturin.
  exo-rust-bindings = final.exo-rs;

  # The web dashboard's static files (upstream's dream2nix npm build of dashboard/).
  exo-dashboard = build "dashboard";

  # This project's tool (pre-flight, supervisor, gateway, K3s registrar), built from this
  # repository's pyproject.toml.
  exo-nixos = final.python3Packages.toPythonApplication final.python3Packages.exo-nixos;

  # A complete node on the CPU (Linux) or on Metal (macOS, where upstream's default build is MLX).
  exo-complete = complete {
    exo = build "exo";
    accelerator = if isDarwin then "mlx" else "cpu";
    description =
      if isDarwin then
        "EXO with dashboard, resources and exo-nixos; MLX on Apple silicon (Metal)"
      else
        "EXO with dashboard, resources and exo-nixos; runs inference on the CPU (MLX CPU backend)";
  };

  # NVIDIA GPUs through MLX's CUDA 13 backend (upstream's exo-cuda-13). MLX's CUDA builds
  # need compute capability 7.5 (Turing) or newer; CUDA 13 needs driver 580 or newer.
  exo-cuda = complete {
    pname = "exo-cuda";
    exo = build "exo-cuda-13";
    accelerator = "cuda";
    requirements = {
      nvidiaDriver = "580";
      computeCapability = "7.5";
    };
    description = "EXO with dashboard, resources and exo-nixos; NVIDIA GPUs through MLX's CUDA 13 backend";
  };

  # Older NVIDIA GPUs and drivers: MLX's CUDA 12 backend. Upstream stopped exporting
  # exo-cuda-12 after v1.0.71 (it is commented out in python/parts.nix at the pinned commit),
  # so platforms.nix lists it nowhere and this evaluates to the error that says so.
  exo-cuda-12 = complete {
    pname = "exo-cuda-12";
    exo = build "exo-cuda-12";
    accelerator = "cuda";
    requirements = {
      nvidiaDriver = "550.54.14";
      computeCapability = "7.5";
    };
    description = "EXO with dashboard, resources and exo-nixos; NVIDIA GPUs through MLX's CUDA 12 backend";
  };

  # Upstream EXO has no ROCm backend. This is the CPU build under the name the modules look
  # up for AMD-GPU hosts; it says so in its name, its metadata, variant.json and on stderr.
  exo-rocm = complete {
    pname = "exo-rocm-cpu-only";
    exo = build "exo";
    accelerator = "cpu";
    requestedAccelerator = "rocm";
    note = "exo-rocm: upstream EXO ${version} has no ROCm backend; this node runs inference on the CPU";
    description = "EXO for AMD-GPU hosts, running on the CPU: upstream EXO has no ROCm backend, so the GPU is not used";
  };

  # Apple silicon: upstream's default build on aarch64-darwin is MLX with Metal.
  exo-mlx = complete {
    pname = "exo-mlx";
    exo = build "exo";
    accelerator = "mlx";
    description = "EXO with dashboard, resources and exo-nixos; MLX on Apple silicon (Metal)";
  };
}
