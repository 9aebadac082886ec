# Option types shared by the exo modules. The value syntaxes come from
# src/exo_nixos/patterns.json, which the Python config model reads too: one pattern, two judges
# that cannot drift apart.
{ lib }:
let
  inherit (lib) types;
  patterns = lib.importJSON ../../../src/exo_nixos/patterns.json;
  # a string of the syntax `name`, and none of the values it reserves
  matching =
    name:
    let
      spec = patterns.${name};
    in
    types.addCheck (types.strMatching spec.pattern) (
      text:
      !(lib.elem text (spec.reserved or [ ]))
      && (!(spec ? maxLength) || builtins.stringLength text <= spec.maxLength)
    )
    // {
      inherit name;
      inherit (spec) description;
    };
in
# one type per syntax of patterns.json (absolutePath, memoryLimit, ...), plus ipAddress
lib.genAttrs (lib.filter (n: !lib.hasPrefix "_" n) (builtins.attrNames patterns)) matching
// {
  inherit patterns;
  # judged by the config model (Python's ipaddress) when config.json is built: one judge
  ipAddress = types.str // {
    name = "ipAddress";
    description = "an IPv4 or IPv6 address such as 0.0.0.0 or ::1";
  };
}
