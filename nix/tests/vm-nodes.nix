# Every NixOS VM test's nodes evaluated the way runNixOSTest evaluates them (nixos/lib/testing/
# nodes.nix: each node's module merged with the test driver's options, hostName defaulting to
# the node's name, addresses 192.168.1.N in node-name order), against the stub NixOS options;
# and each test script rendered with those evaluated nodes. The VM tests themselves need KVM.
{ lib }:
let
  self.nixosModules.default = ../modules/default.nix;
  evalTest =
    file:
    let
      test = import file { inherit self; };
      names = builtins.attrNames test.nodes;
      address = name: "192.168.1.${toString (lib.lists.findFirstIndex (n: n == name) null names + 1)}";
      configs = lib.mapAttrs (
        name: node:
        (import ./evaluate.nix {
          inherit lib;
          modules = [
            ./vm-driver.nix
            {
              networking.primaryIPAddress = address name;
              networking.hostName = lib.mkDefault name;
            }
            node
          ];
        }).config
      ) test.nodes;
    in
    {
      inherit (test) name;
      nodes = lib.mapAttrs (
        _: config:
        import ./eval.nix { inherit lib config; }
        // {
          # what the driver reads to start the VM
          virtualisation = { inherit (config.virtualisation) memorySize cores diskSize; };
          inherit (config.networking) hostName primaryIPAddress;
        }
      ) configs;
      script =
        if builtins.isFunction test.testScript then
          test.testScript { nodes = configs; }
        else
          test.testScript;
    };
in
lib.mapAttrs (_: evalTest) {
  single-node = ./vm/single-node.nix;
  two-node = ./vm/two-node.nix;
  k3s = ./vm/k3s.nix;
  netns = ./vm/netns.nix;
}
