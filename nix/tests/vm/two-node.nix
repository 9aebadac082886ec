# Two EXO nodes on one L2 segment (the test VLAN): they find each other with EXO's own
# discovery (UDP multicast on IPv6 link-local, so nothing but the link is configured) and
# each sees the other in its cluster topology. The firewall stays on; the module opens EXO's
# ports on the cluster interface only.
{ self }:
let
  node = {
    imports = [ (import ./common.nix { inherit self; }) ];
    # The test VLAN is eth1; eth0 is QEMU's user network, not part of the cluster.
    services.exo.networking = {
      bondInterface = "eth1";
      openFirewall = true;
    };
    # Both are NixOS defaults; the test depends on them, so they are stated.
    networking.firewall.enable = true;
    networking.enableIPv6 = true;
  };
in
{
  name = "exo-two-node";

  nodes = {
    alpha = node;
    beta = node;
  };

  testScript =
    { nodes, ... }:
    let
      cfg = nodes.alpha.services.exo;
      api = "http://127.0.0.1:${toString cfg.apiPort}";
    in
    ''
      import json

      start_all()
      for m in (alpha, beta):
          m.wait_for_unit("${cfg.nodeUnit}.service", timeout=600)
          # discovery needs an IPv6 link-local address on the cluster interface
          m.wait_until_succeeds("ip -6 addr show dev eth1 scope link | grep -q fe80::")

      ids = {m.name: json.loads(m.succeed("curl -sf ${api}/node_id")) for m in (alpha, beta)}
      assert ids["alpha"] != ids["beta"], ids


      # Each node's topology lists the other (jq -e fails while it does not).
      for m, other in ((alpha, "beta"), (beta, "alpha")):
          m.wait_until_succeeds(
              f"curl -sf ${api}/state | jq -e --arg id {ids[other]} '.topology.nodes | any(. == $id)'",
              timeout=300,
          )

      # Both nodes see the same cluster: exactly these two nodes.
      def topology_nodes(machine):
          return sorted(json.loads(machine.succeed("curl -sf ${api}/state"))["topology"]["nodes"])


      assert topology_nodes(alpha) == topology_nodes(beta) == sorted(ids.values())
    '';
}
