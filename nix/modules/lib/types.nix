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
  octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
  ipv4 = text: builtins.match "${octet}(\\.${octet}){3}" text != null;
  hexGroup = text: builtins.match "[0-9a-fA-F]{1,4}" text != null;
  groups = text: if text == "" then [ ] else lib.splitString ":" text;
  # RFC 4291 text forms as Python's ipaddress reads them: eight groups, or fewer around one
  # "::", the last two groups optionally a dotted IPv4 address. No zone index ("%eth0").
  ipv6 =
    text:
    let
      halves = lib.splitString "::" text;
      all = lib.concatMap groups halves;
      last = lib.last all;
      embedded = all != [ ] && ipv4 last;
      hex = if embedded then lib.init all else all;
      width = builtins.length hex + (if embedded then 2 else 0);
    in
    builtins.length halves <= 2
    && lib.all hexGroup hex
    && (if builtins.length halves == 2 then width <= 7 else width == 8);
in
# one type per syntax of patterns.json (absolutePath, memoryLimit, ...), plus ipAddress
lib.genAttrs (lib.filter (n: !lib.hasPrefix "_" n) (builtins.attrNames patterns)) matching
// {
  inherit patterns;
  ipAddress = types.addCheck types.str (text: ipv4 text || ipv6 text) // {
    name = "ipAddress";
    description = "an IPv4 or IPv6 address such as 0.0.0.0 or ::1";
  };
}
