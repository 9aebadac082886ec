# Option types shared by the exo modules. The value syntaxes come from
# src/exo_nixos/patterns.json, which the Python config model reads too: one pattern, two judges
# that cannot drift apart.
{ lib }:
let
  inherit (lib) types;
  patterns = lib.importJSON ../../../src/exo_nixos/patterns.json;
  # the JSON Schema the config model generates (a test keeps it current): its enums are the
  # option types' values, so the model's lists are written once
  schema = lib.importJSON ../../../docs/config.schema.json;
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
  accelerator = types.enum schema."$defs".Accelerator.enum;
  mode = types.enum schema."$defs".Mode.enum;
  logLevel = types.enum schema.properties.logLevel.enum;
  # judged by the config model (Python's ipaddress) when config.json is built: one judge
  ipAddress = types.str // {
    name = "ipAddress";
    description = "an IPv4 or IPv6 address such as 0.0.0.0 or ::1";
  };
}
