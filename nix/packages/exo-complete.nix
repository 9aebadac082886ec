# A complete EXO node: one of upstream's EXO builds, its dashboard and resources, and the
# exo-nixos tool, with EXO_DASHBOARD_DIR and EXO_RESOURCES_DIR pointing into this package
# (EXO raises FileNotFoundError at import when it cannot find them). share/exo-nixos/variant.json
# records which accelerator this build really uses, so the tool never has to guess it.
{
  lib,
  stdenvNoCC,
  makeWrapper,
  writeText,
  # upstream's wrapper for one backend (a package with meta.mainProgram)
  exo,
  dashboard,
  # upstream's resources/ directory (model cards)
  resources,
  exo-nixos,
  version,
  # what this build runs inference on: "cpu", "cuda" or "mlx"
  accelerator,
  # the accelerator this package is named after, when it differs (exo-rocm)
  requestedAccelerator ? accelerator,
  # what the host needs for this build: { nvidiaDriver = "580"; computeCapability = "7.5"; }
  # (services.exo.hardware.cudaMinimum* take their defaults from here)
  requirements ? { },
  # one line printed on stderr at every start, for builds that differ from their name
  note ? null,
  pname ? "exo-complete",
  description,
}:
let
  variantData = {
    inherit accelerator version requirements;
    requested = requestedAccelerator;
    note = if note == null then "" else note;
  };
  variant = writeText "exo-variant.json" (builtins.toJSON (variantData // { exo = "${exo}"; }));
  noteArgs = lib.optionals (note != null) [
    "--run"
    "echo ${lib.escapeShellArg note} >&2"
  ];
in
stdenvNoCC.mkDerivation {
  inherit pname version;

  dontUnpack = true;
  nativeBuildInputs = [ makeWrapper ];

  installPhase = ''
    runHook preInstall
    mkdir -p $out/bin $out/share/exo $out/share/exo-nixos
    ln -s ${dashboard} $out/share/exo/dashboard
    ln -s ${resources} $out/share/exo/resources
    makeWrapper ${lib.getExe exo} $out/bin/exo \
      --set EXO_DASHBOARD_DIR $out/share/exo/dashboard \
      --set EXO_RESOURCES_DIR $out/share/exo/resources \
      ${lib.escapeShellArgs noteArgs}
    ln -s ${lib.getExe' exo-nixos "exo-nixos"} $out/bin/exo-nixos
    cp ${variant} $out/share/exo-nixos/variant.json
    runHook postInstall
  '';

  doInstallCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    test -d $out/share/exo/dashboard
    test -d $out/share/exo/resources
    test -x $out/bin/exo
    $out/bin/exo-nixos --help >/dev/null
    runHook postInstallCheck
  '';

  passthru = {
    # what share/exo-nixos/variant.json says, readable at evaluation time
    variant = variantData;
    inherit
      accelerator
      requestedAccelerator
      exo
      dashboard
      resources
      ;
  };

  meta = {
    inherit description;
    homepage = "https://github.com/exo-explore/exo";
    license = lib.licenses.asl20;
    mainProgram = "exo";
    platforms = exo.meta.platforms or lib.platforms.unix;
  };
}
