# Python packages for every Python package set (pythonPackagesExtensions): the exo-nixos
# library itself and lightkube, which its K3s registrar needs and nixpkgs lacks. EXO's own
# Python dependencies are not overridden here: upstream's uv2nix build pins them from uv.lock,
# and changing them would give a different EXO than the release tested upstream.
final: prev: {
  pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
    (pyfinal: pyprev: {
      lightkube = pyprev.lightkube or (pyfinal.callPackage ../packages/python/lightkube.nix { });
      exo-nixos = pyfinal.callPackage ../packages/exo-nixos.nix { pythonPackages = pyfinal; };
    })
  ];
}
