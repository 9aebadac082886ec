# EXO's Rust extension (exo_pyo3_bindings: networking, discovery, keys) as `pkgs.exo-pyo3-bindings`:
# the wheel upstream's flake builds with crane + maturin and its Rust toolchain (fenix stable)
# from the pinned release; it is the wheel upstream installs into exo-python's virtualenv.
{ exo }:
final: _prev: {
  exo-pyo3-bindings =
    let
      system = final.stdenv.hostPlatform.system;
    in
    exo.packages.${system}.exo_pyo3_bindings
      or (throw "exo-pyo3-bindings: upstream EXO builds its Rust bindings for x86_64-linux, aarch64-linux and aarch64-darwin, not ${system}");
}
