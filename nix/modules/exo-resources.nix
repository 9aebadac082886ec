# services.exo.resources: priority and memory pressure of the EXO node unit.
# EXO has no runtime memory interface; what this project does instead is in docs/monitoring.md:
# MemoryHigh below MemoryMax (the kernel reclaims before it kills), PSI shown as degraded, and a
# smaller OVERRIDE_MEMORY_MB after an OOM kill (recorded by ExecStopPost).
{ config, lib, ... }:
let
  inherit (lib) mkOption mkIf mkDefault types;
  cfg = config.services.exo;
  res = cfg.resources;
  exoNixos = lib.getExe' cfg.toolPackage "exo-nixos";
  limit = cfg.hardware.memoryLimit;
  # hardware.nodePerGpu: the node unit is a template; each instance's drop-in has its own
  # share of MemoryMax, so MemoryHigh (a share of the whole limit) is left to the drop-ins' MemoryMax
  perGpu = cfg.hardware.nodePerGpu.enable or false;
  value = import ./lib/memory-limit.nix { inherit lib; } limit;
  scaled = number: number * res.memoryHighPercent / 100.0;
  # memoryHighPercent of the limit: a share of a share stays a percentage, a size is in bytes
  memoryHigh =
    if value ? percent then "${toString (builtins.floor (scaled value.percent))}%"
    else toString (builtins.floor (scaled value.bytes));
in
{
  imports = [ ./exo-service.nix ./exo-hardware.nix ];

  options.services.exo.resources = {
    cpuWeight = mkOption {
      type = types.nullOr (types.ints.between 1 10000);
      default = null;
      example = 200;
      description = ''
        `CPUWeight=` of the node unit (systemd's default is 100): its share of CPU time against
        other services when the CPUs are busy. `null` keeps systemd's default.
      '';
    };
    ioWeight = mkOption {
      type = types.nullOr (types.ints.between 1 10000);
      default = null;
      example = 50;
      description = ''
        `IOWeight=` of the node unit (default 100): its share of disk time, e.g. lower so model
        downloads do not starve other services. `null` keeps systemd's default.
      '';
    };
    nice = mkOption {
      type = types.nullOr (types.ints.between (-20) 19);
      default = null;
      example = 5;
      description = ''
        `Nice=` of EXO and its runners (-20 highest priority, 19 lowest); `null` keeps 0. A
        negative value needs no capability: systemd sets it before dropping privileges.
      '';
    };
    memoryHighPercent = mkOption {
      type = types.ints.between 50 100;
      default = 90;
      description = ''
        With {option}`services.exo.hardware.memoryLimit` set, `MemoryHigh=` of the node unit is
        this share of it (`MemoryMax=`): above it the kernel throttles and reclaims EXO's memory
        (visible as memory pressure in `exo-nixos status` and the exporter) before the OOM
        killer acts at `MemoryMax`. `100` leaves `MemoryHigh=` unset.
      '';
    };
  };

  config = mkIf cfg.enable {
    systemd.services.${cfg.nodeUnit}.serviceConfig = {
      CPUWeight = mkIf (res.cpuWeight != null) res.cpuWeight;
      IOWeight = mkIf (res.ioWeight != null) res.ioWeight;
      Nice = mkIf (res.nice != null) res.nice;
      MemoryHigh = mkIf (limit != null && res.memoryHighPercent < 100 && !perGpu) (mkDefault memoryHigh);
      # An OOM kill of any process of the unit stops the whole unit (systemd's default, made
      # explicit): $SERVICE_RESULT is then "oom-kill", which ExecStopPost records so that the
      # next start offers EXO less memory. Restart=always starts it again.
      OOMPolicy = "stop";
      ExecStopPost = "${exoNixos} record-stop --config ${cfg.configFile}${lib.optionalString perGpu " --instance %i"}";
    };
  };
}
