# How systemd-networkd reads two settings of a .network file, for the checks the modules make
# on the host's own networkd configuration (systemd.network(5), src/shared/net-condition.c and
# src/basic/parse-util.c in systemd).
{ lib }:
let
  # fnmatch(3) as networkd applies it to [Match] Name=: "*", "?" and "[...]" are wildcards,
  # every other character stands for itself. Turned into a POSIX ERE for builtins.match.
  globToRegex =
    glob:
    let
      chars = lib.stringToCharacters glob;
      one =
        c:
        if c == "*" then
          ".*"
        else if c == "?" then
          "."
        else if c == "[" || c == "]" then
          c
        else if builtins.match "[A-Za-z0-9_-]" c != null then
          c
        else
          "[${c}]";
    in
    lib.concatMapStrings one chars;

  # A [Match] Name= list: space-separated patterns; a leading "!" inverts the whole list.
  matchesName =
    patterns: iface:
    let
      words = lib.filter (w: w != "") (
        lib.concatMap (lib.splitString " ") (map toString (lib.toList patterns))
      );
      inverted = words != [ ] && lib.hasPrefix "!" (builtins.head words);
      globs = if inverted then [ (lib.removePrefix "!" (builtins.head words)) ] ++ builtins.tail words else words;
      hit = lib.any (g: builtins.match (globToRegex g) iface != null) globs;
    in
    words != [ ] && (if inverted then !hit else hit);

  # LinkLocalAddressing= values that leave IPv6 link-local addressing off: every boolean
  # spelling of "no" systemd's parse_boolean accepts, and the IPv4-only values.
  ipv6LinkLocalOff =
    value:
    builtins.elem (lib.toLower (toString value)) [
      ""
      "no"
      "false"
      "0"
      "off"
      "n"
      "f"
      "ipv4"
      "fallback"
      "ipv4-fallback"
    ]
    && value != null;
in
{
  inherit globToRegex matchesName ipv6LinkLocalOff;
}
