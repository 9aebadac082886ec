# One EXO node in a network namespace of its own (services.exo.networking.networkNamespace):
# exo-netns.service creates it with its loopback up, so the node reaches READY (the
# supervisor's probe and EXO's API are on 127.0.0.1 inside it), and the API answers there and
# not on the host's loopback.
{ self }:
{
  name = "exo-netns";

  nodes.machine = {
    imports = [ (import ./common.nix { inherit self; }) ];
    services.exo.networking.networkNamespace = "exo";
  };

  testScript =
    { nodes, ... }:
    let
      cfg = nodes.machine.services.exo;
      netns = cfg.networking.networkNamespace;
      api = "http://127.0.0.1:${toString cfg.apiPort}";
      hasGateway = nodes.machine.systemd.services ? exo-api;
    in
    ''
      import json

      machine.wait_for_unit("exo-netns.service")
      machine.succeed("ip netns list | grep -qw ${netns}")
      lo = json.loads(machine.succeed("ip -n ${netns} -j link show lo"))[0]
      assert "UP" in lo["flags"], lo

      # READY: the supervisor saw EXO's API answer on the namespace's loopback.
      machine.wait_for_unit("${cfg.nodeUnit}.service", timeout=600)
      node_id = json.loads(machine.succeed("ip netns exec ${netns} curl -sf ${api}/node_id"))
      assert isinstance(node_id, str) and node_id, f"no node id: {node_id!r}"
      machine.fail("curl -sf --max-time 5 ${api}/node_id")

      # Running the unit again (a second start, or a namespace an admin made) keeps it.
      machine.succeed("systemctl restart exo-netns.service")
      machine.succeed("ip netns list | grep -qw ${netns}")
      machine.wait_for_unit("${cfg.nodeUnit}.service", timeout=600)
    ''
    + (
      if hasGateway then
        ''
          machine.wait_for_unit("exo-api.service")
          machine.wait_until_succeeds(
              "ip netns exec ${netns} curl -sf http://127.0.0.1:${toString cfg.gateway.port}/health",
              timeout=120,
          )
        ''
      else
        ""
    );
}
