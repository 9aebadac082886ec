# lightkube, the Kubernetes client the K3s registrar uses, with its models (neither is in
# nixpkgs): the same versions pip resolves for pyproject.toml's `lightkube>=0.15`. Both wheels
# install the regular package `lightkube/`, so they must land in one site-packages tree:
# lightkube's `__init__.py` would otherwise hide `lightkube.models` in a second store path.
# The models follow the Kubernetes schema version in their number.
{
  lib,
  buildPythonPackage,
  fetchurl,
  httpx2,
  msgspec,
  pyyaml,
}:
let
  modelsVersion = "1.37.0.8";
  models = fetchurl {
    url = "https://files.pythonhosted.org/packages/2b/98/71f1f7d80b825b2cf16571ad969ee8fcfc12ffc246a3b85531b81b08443c/lightkube_models-${modelsVersion}-py3-none-any.whl";
    hash = "sha256-/loWoqJm/RpaFHLW8e6HPbyF1pC8jWBRKx4BFXo9Z0U=";
  };
in
buildPythonPackage rec {
  pname = "lightkube";
  version = "1.0.1";
  format = "wheel";

  src = fetchurl {
    url = "https://files.pythonhosted.org/packages/d8/a0/9cf2061cb19c3c732408a5d28bca61774fefdb7ea67105ff2bed4b01defa/lightkube-${version}-py3-none-any.whl";
    hash = "sha256-CUpq5qL6iVGJRQhlkVlk0DM20VYfyfxvSHhqB1Bzx4I=";
  };

  # The install hook installs every wheel under dist/: add the models next to lightkube.
  preInstall = ''
    cp ${models} dist/lightkube_models-${modelsVersion}-py3-none-any.whl
  '';

  dependencies = [
    httpx2
    msgspec
    pyyaml
  ];

  # lightkube requires lightkube-models, which is installed into this same output rather than
  # provided as a separate dependency the runtime-deps check could see.
  dontCheckRuntimeDeps = true;

  pythonImportsCheck = [
    "lightkube"
    "lightkube.config.kubeconfig"
    "lightkube.models.core_v1"
    "lightkube.resources.discovery_v1"
  ];

  passthru.modelsVersion = modelsVersion;

  meta = {
    description = "Modern lightweight Kubernetes client for Python, with its Kubernetes models";
    homepage = "https://github.com/gtsystem/lightkube";
    license = lib.licenses.mit;
  };
}
