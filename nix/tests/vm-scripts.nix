# The Python test scripts of the NixOS VM tests, rendered with stand-in node configurations,
# so their syntax and names can be checked here; the VM tests themselves need KVM.
{ lib }:
let
  self = {
    nixosModules.default = { };
  };
  exo = {
    apiPort = 52415;
    nodeUnit = "exo-worker";
    gateway.port = 52417;
    security.user = "exo";
    k3s = {
      namespace = "exo-system";
      serviceAccount = "exo";
      serviceName = "exo-api";
    };
  };
  node = address: {
    services.exo = exo;
    systemd.services = {
      exo-worker = { };
      exo-api = { };
    };
    networking.primaryIPAddress = address;
  };
  render =
    file:
    let
      test = import file { inherit self; };
      nodes = lib.mapAttrs (_: _: node "192.168.1.1") test.nodes;
    in
    {
      inherit (test) name;
      nodes = builtins.attrNames test.nodes;
      script = if builtins.isFunction test.testScript then test.testScript { inherit nodes; } else test.testScript;
    };
in
{
  single-node = render ./vm/single-node.nix;
  two-node = render ./vm/two-node.nix;
  k3s = render ./vm/k3s.nix;
}
