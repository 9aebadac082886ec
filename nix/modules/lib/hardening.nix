# The systemd sandbox every EXO unit starts from (a plain attribute set, not a module):
#   serviceConfig = import ./lib/hardening.nix // { <this unit's additions and relaxations> };
# A unit states only where it differs, each relaxation with its reason. Device access
# (PrivateDevices, DevicePolicy, DeviceAllow) is left to each unit: the node's comes from
# exo-hardware.nix at priorities a host can override, so it must not be set here.
{
  CapabilityBoundingSet = "";
  AmbientCapabilities = "";
  NoNewPrivileges = true;
  PrivateTmp = true;
  PrivateMounts = true;
  PrivateUsers = true;
  ProtectSystem = "strict";
  ProtectHome = true;
  ProtectClock = true;
  ProtectControlGroups = true;
  ProtectHostname = true;
  ProtectKernelLogs = true;
  ProtectKernelModules = true;
  ProtectKernelTunables = true;
  ProtectProc = "invisible";
  ProcSubset = "pid";
  LockPersonality = true;
  MemoryDenyWriteExecute = true;
  RemoveIPC = true;
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  SystemCallArchitectures = "native";
  SystemCallFilter = [ "@system-service" "~@privileged" ];
  SystemCallErrorNumber = "EPERM";
  UMask = "0077";
}
