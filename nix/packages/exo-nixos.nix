# The exo-nixos tool as a Python package, built from this repository's pyproject.toml
# (setuptools). Its dependencies are read from pyproject.toml, so the Nix build and pip stay
# in step; one nixpkgs lacks is added in nix/overlays/python-overrides.nix.
{
  lib,
  python,
  pythonPackages,
  buildPythonPackage,
  setuptools,
}:
let
  pyproject = lib.importTOML ../../pyproject.toml;
  # "PyYAML>=6.0" -> "pyyaml"; nixpkgs' Python attribute names are the lowercased PyPI names.
  attrName = requirement: lib.toLower (builtins.head (builtins.match "([A-Za-z0-9_.-]+).*" requirement));
  dependency =
    requirement:
    let
      name = attrName requirement;
    in
    pythonPackages.${name}
      or (throw "exo-nixos: dependency '${requirement}' from pyproject.toml is not in ${python.pname}Packages; add it to nix/overlays/python-overrides.nix");
  pythonDependencies = map dependency pyproject.project.dependencies;
in
buildPythonPackage {
  pname = "exo-nixos";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../pyproject.toml
      ../../README.md
      ../../src
    ];
  };

  build-system = [ setuptools ];
  dependencies = pythonDependencies;

  pythonImportsCheck = [
    "exo_nixos"
    "exo_nixos.cli"
    "exo_nixos.config"
  ];

  # for development shells and checks that run the tool from the source tree
  passthru = { inherit pythonDependencies; };

  meta = {
    inherit (pyproject.project) description;
    license = lib.licenses.asl20;
    mainProgram = "exo-nixos";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
