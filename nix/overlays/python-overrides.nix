# Python packages for every Python package set (pythonPackagesExtensions): the exo-nixos
# library itself and what its K3s registrar needs that nixpkgs lacks: lightkube (with its
# models) and the HTTP client it is built on, httpx2 with httpcore2. EXO's own
# Python dependencies are not overridden here: upstream's uv2nix build pins them from uv.lock,
# and changing them would give a different EXO than the one built and tested upstream.
final: prev: {
  pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
    (pyfinal: pyprev: {
      httpcore2 = pyprev.httpcore2 or (pyfinal.callPackage ../packages/python/httpcore2.nix { });
      httpx2 = pyprev.httpx2 or (pyfinal.callPackage ../packages/python/httpx2.nix { });
      lightkube = pyprev.lightkube or (pyfinal.callPackage ../packages/python/lightkube.nix { });
      exo-nixos = pyfinal.callPackage ../packages/exo-nixos.nix { pythonPackages = pyfinal; };
    })
  ];
}
