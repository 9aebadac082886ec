# httpx2, the HTTP client lightkube 1.x is built on (not in nixpkgs). A pure-Python wheel
# from PyPI, with the http2 and ws extras lightkube asks for.
{
  lib,
  buildPythonPackage,
  fetchurl,
  anyio,
  httpcore2,
  idna,
  truststore,
  h2,
  wsproto,
}:
buildPythonPackage rec {
  pname = "httpx2";
  version = "2.16.2";
  format = "wheel";

  src = fetchurl {
    url = "https://files.pythonhosted.org/packages/77/de/8c4306a3d6aa2495111986addf33a9e561eff4c47552e4c4b9251160d0ad/httpx2-${version}-py3-none-any.whl";
    hash = "sha256-8FwTqt5MRdvxyQYGR6EFjwrK1iOY+tludBJp7bM9RvU=";
  };

  dependencies = [
    anyio
    httpcore2
    idna
    truststore
    h2
    wsproto
  ];

  # The wheel asks for idna>=3.18 and anyio>=4.10, newer than some nixpkgs releases carry;
  # httpx2 uses only idna's long-stable encode/decode and anyio's public API. The import
  # check below still has to pass.
  dontCheckRuntimeDeps = true;

  pythonImportsCheck = [ "httpx2" ];

  meta = {
    description = "Next-generation HTTP client for Python (the httpx fork lightkube 1.x uses)";
    homepage = "https://pypi.org/project/httpx2/";
    license = lib.licenses.bsd3;
  };
}
