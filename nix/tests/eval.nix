# What the module tests assert on, as plain data, from an evaluated configuration: by default
# the exo modules plus `modules` (./evaluate.nix). Used by tests/nixeval.py and ./vm-nodes.nix.
{
  lib,
  modules ? [ ],
  config ? (import ./evaluate.nix { inherit lib modules; }).config,
}:
let
  cfg = config;
  # what a stub derivation (../tests/stub-pkgs.nix) is made from, as data tests/nixeval.py
  # builds: generated files by value, packages by name, other settings as they are
  input = value:
    if value ? generatedValue then { generated = value.generatedValue; }
    else if lib.isDerivation value then { package = value.name; }
    else if builtins.isList value then map input value
    else value;
  recipe = drv: { __build = { inherit (drv) name command; env = lib.mapAttrs (_: input) drv.env; }; };
  fileContent = entry:
    if entry.text != null then entry.text
    else if entry.source ? generatedValue then entry.source.generatedValue
    else if entry.source ? command then recipe entry.source
    else toString entry.source;
  # StartLimit*= are in unitConfig, as NixOS writes them; the options have no default
  unit = u: builtins.removeAttrs u [ "restartTriggers" "reloadTriggers" "startLimitIntervalSec" "startLimitBurst" ];
in
{
  assertions = map (a: a.message) (builtins.filter (a: !a.assertion) cfg.assertions);
  inherit (cfg) warnings users;
  services = lib.mapAttrs (_: unit) (lib.filterAttrs (_: s: s.enable) cfg.systemd.services);
  targets = lib.mapAttrs (_: unit) (lib.filterAttrs (_: t: t.enable) cfg.systemd.targets);
  tmpfiles = cfg.systemd.tmpfiles.rules;
  firewall = cfg.networking.firewall;
  etc = lib.mapAttrs' (_: e: lib.nameValuePair e.target (fileContent e))
    (lib.filterAttrs (_: e: e.enable) cfg.environment.etc);
  systemPackages = map (p: p.name) cfg.environment.systemPackages;
  kernelModules = cfg.boot.kernelModules;
  # as sysctl.d gets them: null means the key is not written
  sysctl = lib.filterAttrs (_: v: v != null) cfg.boot.kernel.sysctl;
  nixSettings = { inherit (cfg.nix.settings) substituters trusted-public-keys; };
  k3sManifests = lib.mapAttrs
    (_: m: { inherit (m) enable target content; source = m.source.name or (toString m.source); })
    cfg.services.k3s.manifests;
  exo = {
    inherit (cfg.services.exo) enable nodeUnit;
    configDocument = cfg.services.exo.configDocument;
  };
}
