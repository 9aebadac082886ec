# An attribute set that looks like a derivation named `name` (a store path derived from the
# name, meta.mainProgram), for evaluations that build nothing.
name: {
  type = "derivation";
  inherit name;
  pname = name;
  outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
  meta.mainProgram = name;
}
