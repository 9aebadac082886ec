# lightkube, the Kubernetes client the K3s registrar uses, with its models (neither is in
# nixpkgs). Both wheels install the regular package `lightkube/`, so they must land in one
# site-packages tree: lightkube's `__init__.py` would otherwise hide `lightkube.models` in a
# second store path. 0.19.1 is the newest lightkube on httpx; 1.x moved to httpx2, which
# nixpkgs does not package. The models follow the Kubernetes schema version in their number.
{
  lib,
  buildPythonPackage,
  fetchurl,
  httpx,
  h2,
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
  version = "0.19.1";
  format = "wheel";

  src = fetchurl {
    url = "https://files.pythonhosted.org/packages/e6/ef/7faeb245e50e79452bc1f52b90931e7f6ccbcc19c884721f352c7abb4321/lightkube-${version}-py3-none-any.whl";
    hash = "sha256-Sf7wihx6pCCCggER/9XbuvePVMmThYEGkPydlO71yA0=";
  };

  # The install hook installs every wheel under dist/: add the models next to lightkube.
  preInstall = ''
    cp ${models} dist/lightkube_models-${modelsVersion}-py3-none-any.whl
  '';

  dependencies = [
    httpx
    h2
    pyyaml
  ];

  # lightkube requires lightkube-models, which is installed into this same output, not
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
