# The sandbox of the units that only speak HTTP over the network (the gateway, the exporter,
# the model reconciler): the baseline (hardening.nix) and no devices, IPC, keyring, resource
# control or netlink.
#   serviceConfig = import ./lib/network-service.nix // { <this unit's additions> };
let
  hardening = import ./hardening.nix;
in
hardening
// {
  PrivateDevices = true;
  DevicePolicy = "closed";
  PrivateIPC = true;
  KeyringMode = "private";
  RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
  SystemCallFilter = hardening.SystemCallFilter ++ [ "~@resources" ];
}
