# EXO's Rust extension (the Python module `exo_rs`: networking over zenoh, discovery, keys) as
# `pkgs.exo-rs`: the wheel upstream's flake builds with crane + maturin and its Rust toolchain
# (fenix stable) from the pinned commit, the wheel upstream installs into exo-python's
# virtualenv. Upstream named it `exo_pyo3_bindings` up to v1.0.71 and `exo-rs` since.
{ exo }:
final: _prev: {
  exo-rs =
    let
      system = final.stdenv.hostPlatform.system;
    in
    exo.packages.${system}.exo-rs
      or (throw "exo-rs: upstream EXO (flake.lock) exports no packages.${system}.exo-rs; it builds its Rust bindings for x86_64-linux, aarch64-linux and aarch64-darwin");
}
