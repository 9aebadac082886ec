# One EXO node: the node unit reaches READY (Type=notify: systemd calls it active only once
# the supervisor has seen EXO's API answer), EXO's API answers, the config document the module
# wrote is one the tool accepts, and the gateway answers /health when the module runs it.
{ self }:
{
  name = "exo-single-node";

  nodes.machine = import ./common.nix { inherit self; };

  testScript =
    { nodes, ... }:
    let
      cfg = nodes.machine.services.exo;
      api = "http://127.0.0.1:${toString cfg.apiPort}";
      gateway = "http://127.0.0.1:${toString cfg.gateway.port}";
      hasGateway = nodes.machine.systemd.services ? exo-api;
    in
    ''
      import json

      machine.wait_for_unit("exo.target")
      machine.wait_for_unit("${cfg.nodeUnit}.service", timeout=600)

      machine.succeed("exo-nixos config validate /etc/exo/config.json")

      node_id = json.loads(machine.succeed("curl -sf ${api}/node_id"))
      assert isinstance(node_id, str) and node_id, f"no node id: {node_id!r}"
      machine.succeed("curl -sf ${api}/models")

      state = json.loads(machine.succeed("curl -sf ${api}/state"))
      assert node_id in state["topology"]["nodes"], state["topology"]

      # EXO runs as the service user, not as root.
      machine.succeed("test \"$(systemctl show -p User --value ${cfg.nodeUnit}.service)\" = ${cfg.security.user}")
    ''
    + (
      if hasGateway then
        ''
          machine.wait_for_unit("exo-api.service")
          machine.wait_until_succeeds("curl -sf ${gateway}/health", timeout=120)
        ''
      else
        ""
    );
}
