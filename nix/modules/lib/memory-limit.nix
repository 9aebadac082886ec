# services.exo.hardware.memoryLimit read as a value: { percent = 80; } or { bytes = 51539607552; }.
# The syntax is patterns.json's memoryLimit (groups: number, fraction, "%" or unit with suffix,
# unit, suffix), the one the config model accepts.
{ lib }:
let
  inherit (import ./types.nix { inherit lib; }) patterns;
  unitBytes = { K = 1024; M = 1048576; G = 1073741824; T = 1099511627776; };
in
text:
let
  parts = builtins.match patterns.memoryLimit.pattern text;
  number = builtins.fromJSON (builtins.elemAt (builtins.match "0*([0-9].*)" (builtins.elemAt parts 0)) 0);
in
if builtins.elemAt parts 2 == "%" then { percent = number; }
else { bytes = number * unitBytes.${lib.toUpper (builtins.elemAt parts 3)}; }
