# httpcore2, the HTTP transport under httpx2 (lightkube 1.x's HTTP client; not in nixpkgs).
# A pure-Python wheel from PyPI.
{
  lib,
  buildPythonPackage,
  fetchurl,
  h11,
  h2,
  anyio,
  truststore,
}:
buildPythonPackage rec {
  pname = "httpcore2";
  version = "2.16.2";
  format = "wheel";

  src = fetchurl {
    url = "https://files.pythonhosted.org/packages/2a/e8/009c347feac27f8960605aa98d55ed263b5870dd4fd80b82fd1d00d5716c/httpcore2-${version}-py3-none-any.whl";
    hash = "sha256-FgUa4qQvd2AHVD8y3pNJoxeyPSy7ThRWtLrA6IuHQZo=";
  };

  # h11 and truststore always; h2 and anyio for the http2 and asyncio extras httpx2 uses.
  dependencies = [
    h11
    h2
    anyio
    truststore
  ];

  pythonImportsCheck = [ "httpcore2" ];

  meta = {
    description = "Minimal low-level HTTP client (httpx2's transport)";
    homepage = "https://pypi.org/project/httpcore2/";
    license = lib.licenses.bsd3;
  };
}
