# A K3s server with EXO on the same host: the module hands the static objects (Namespace,
# ServiceAccount, RBAC, the selector-less Service) to K3s as manifests, and the registrar puts
# this node into the Service's EndpointSlice, ready while EXO answers.
{ self }:
{
  name = "exo-k3s";

  nodes.server =
    { config, pkgs, ... }:
    {
      imports = [ (import ./common.nix { inherit self; }) ];

      services.k3s = {
        enable = true;
        role = "server";
        # Only the API server is needed: no workloads run, so no images have to be pulled.
        extraFlags = [
          "--disable"
          "coredns"
          "--disable"
          "local-storage"
          "--disable"
          "metrics-server"
          "--disable"
          "servicelb"
          "--disable"
          "traefik"
          "--node-ip"
          config.networking.primaryIPAddress
        ];
      };

      services.exo.k3s = {
        integration = true;
        # K3s' admin kubeconfig, handed to the registrar by systemd (LoadCredential); a real
        # host would rather use the exo ServiceAccount's token (tokenFile).
        kubeconfigFile = "/etc/rancher/k3s/k3s.yaml";
        nodeAddress = config.networking.primaryIPAddress;
      };

      virtualisation.memorySize = 6144;
      virtualisation.diskSize = 8192;
    };

  testScript =
    { nodes, ... }:
    let
      k3s = nodes.server.services.exo.k3s;
      address = nodes.server.networking.primaryIPAddress;
      kubectl = "k3s kubectl -n ${k3s.namespace}";
    in
    ''
      server.wait_for_unit("k3s.service")
      server.wait_until_succeeds("k3s kubectl get --raw /readyz", timeout=300)
      server.wait_for_unit("${nodes.server.services.exo.nodeUnit}.service", timeout=600)

      # The manifests K3s applied from the module.
      server.wait_until_succeeds("k3s kubectl get namespace ${k3s.namespace}", timeout=120)
      server.succeed("${kubectl} get serviceaccount ${k3s.serviceAccount}")
      server.succeed("${kubectl} get service ${k3s.serviceName}")

      # The registrar's EndpointSlice entry: this node's address, ready.
      server.wait_until_succeeds(
          "${kubectl} get endpointslices -l kubernetes.io/service-name=${k3s.serviceName} -o json"
          " | jq -e '[.items[].endpoints[]? | select(.addresses | index(\"${address}\"))"
          " | select(.conditions.ready == true)] | length == 1'",
          timeout=300,
      )
    '';
}
