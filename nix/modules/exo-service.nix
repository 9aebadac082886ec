# services.exo: the EXO node as a systemd service, and the config document every exo-nixos
# command reads (/etc/exo/config.json, schemaVersion 1). Behaviour lives in the Python tool.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkEnableOption mkPackageOption mkOption mkIf types literalExpression;
  cfg = config.services.exo;
  json = pkgs.formats.json { };
  absolutePath = types.strMatching "/.*";
  configFile = json.generate "exo-config.json" cfg.configDocument;
  nodeUnit = if cfg.mode == "master" then "exo-master" else "exo-worker";
in
{
  options.services.exo = {
    enable = mkEnableOption "EXO distributed AI inference on this host";

    package = mkPackageOption pkgs "exo-complete" {
      extraDescription = ''
        The CPU build of EXO (with dashboard and resources). Accelerated variants are listed
        in {option}`services.exo.hardware.packages`.
      '';
    };

    toolPackage = mkPackageOption pkgs "exo-nixos" {
      extraDescription = "The exo-nixos tool: pre-flight, supervisor, gateway, K3s registrar.";
    };

    mode = mkOption {
      type = types.enum [ "master" "worker" "auto" ];
      default = "auto";
      example = "master";
      description = ''
        Node role. `master` runs exo with `--force-master` as `exo-master.service`; `worker`
        and `auto` run a plain node as `exo-worker.service`. EXO elects its master itself and
        has no never-master flag: `worker` cannot stop this node from winning an election when
        no `master` node is up.
      '';
    };

    noWorker = mkOption {
      type = types.bool;
      default = false;
      description = "With mode `master`: coordinate only, run no inference (`--no-worker`).";
    };

    apiPort = mkOption {
      type = types.port;
      default = 52415;
      description = ''
        EXO's own API port (bound on all addresses by EXO; it must be equal on every node,
        since nodes probe each other's `/node_id` there). Clients should use the gateway.
      '';
    };

    clusterNamespace = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "rack-a";
      description = ''
        EXO `--namespace`: only nodes with the same namespace see each other. `null` keeps
        EXO's default, its version string, so nodes of different EXO versions never mix.
      '';
    };

    logLevel = mkOption {
      type = types.enum [ "error" "warning" "info" "debug" ];
      default = "info";
      description = "Log level of the supervisor; `debug` also makes EXO verbose (`-v`).";
    };

    offline = mkOption {
      type = types.bool;
      default = false;
      description = "Run EXO offline (`EXO_OFFLINE`): no model downloads, local models only.";
    };

    modelsDir = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/srv/models";
      description = ''
        Where EXO downloads models (`EXO_DEFAULT_MODELS_DIR`); `null` means
        `''${security.dataDir}/models`. A directory outside the data dir is made writable for
        the service explicitly.
      '';
    };

    extraModelDirs = mkOption {
      type = types.listOf absolutePath;
      default = [ ];
      description = "More writable model directories (`EXO_MODELS_DIRS`).";
    };

    readOnlyModelDirs = mkOption {
      type = types.listOf absolutePath;
      default = [ ];
      example = [ "/nfs/models" ];
      description = "Model directories EXO reads but never writes (`EXO_MODELS_READ_ONLY_DIRS`).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--no-batch" ];
      description = "Extra command-line arguments passed to exo.";
    };

    environmentVariables = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { EXO_MAX_CONCURRENT_REQUESTS = "16"; };
      description = ''
        Extra environment for exo. These land in the Nix store: put secrets such as
        `HF_TOKEN` in {option}`services.exo.environmentFile` instead.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/run/secrets/exo.env";
      description = ''
        A file of `KEY=value` lines (for example `HF_TOKEN=...`) read by systemd when the node
        starts; never copied into the Nix store.
      '';
    };

    healthCheck = {
      intervalSec = mkOption {
        type = types.numbers.positive;
        default = 5;
        description = "Seconds between the supervisor's probes of the node API.";
      };
      timeoutSec = mkOption {
        type = types.numbers.positive;
        default = 3;
        description = "Seconds a probe may take before it counts as failed.";
      };
      failures = mkOption {
        type = types.ints.between 1 100;
        default = 3;
        description = "Consecutive failed probes before the node counts as down.";
      };
    };

    security = {
      user = mkOption {
        type = types.str;
        default = "exo";
        description = "System user the EXO units run as (created when left at `exo`).";
      };
      group = mkOption {
        type = types.str;
        default = "exo";
        description = "Group of the EXO units (created when left at `exo`).";
      };
      dataDir = mkOption {
        type = absolutePath;
        default = "/var/lib/exo";
        description = "Models, event logs and topology snapshots.";
      };
      cacheDir = mkOption {
        type = absolutePath;
        default = "/var/cache/exo";
        description = "EXO's cache: pid file, logs, images, traces.";
      };
      configDir = mkOption {
        type = absolutePath;
        default = "/etc/exo";
        description = "Where `config.json` and EXO's own `config.toml` live.";
      };
      runtimeDir = mkOption {
        type = absolutePath;
        default = "/run/exo";
        description = "Runtime directory (`EXO_RUNTIME_DIR`).";
      };
    };

    configDocument = mkOption {
      type = json.type;
      default = { };
      internal = true;
      description = ''
        The document written to `''${security.configDir}/config.json`. Each exo module adds its
        section; the keys are the option names, as the Python tool's typed model expects.
      '';
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      internal = true;
      default = configFile;
      defaultText = literalExpression "generated from services.exo options";
      description = "The generated config document (a store path).";
    };

    nodeUnit = mkOption {
      type = types.str;
      readOnly = true;
      internal = true;
      default = nodeUnit;
      description = "Name of this host's EXO node unit: `exo-master` or `exo-worker`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.noWorker -> cfg.mode == "master";
        message = ''services.exo.noWorker only applies to mode "master"; set services.exo.mode = "master" or remove noWorker.'';
      }
    ];

    services.exo.configDocument = {
      schemaVersion = 1;
      inherit (cfg)
        mode noWorker apiPort clusterNamespace logLevel offline modelsDir extraModelDirs
        readOnlyModelDirs extraArgs environmentVariables healthCheck security;
    };

    environment.etc."exo/config.json".source = configFile;
    environment.systemPackages = [ cfg.toolPackage ];

    users.users = mkIf (cfg.security.user == "exo") {
      exo = {
        isSystemUser = true;
        group = cfg.security.group;
        home = cfg.security.dataDir;
        description = "EXO distributed inference";
      };
    };
    users.groups = mkIf (cfg.security.group == "exo") { exo = { }; };

    systemd.targets.exo = {
      description = "EXO distributed AI inference";
      wantedBy = [ "multi-user.target" ];
      wants = [ "${nodeUnit}.service" ];
    };

    systemd.services.${nodeUnit} = {
      description = if cfg.mode == "master" then "EXO master node" else "EXO worker node";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      partOf = [ "exo.target" ];
      wantedBy = [ "exo.target" ];
      restartTriggers = [ configFile ];
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        User = cfg.security.user;
        Group = cfg.security.group;
        ExecStartPre = "${lib.getExe' cfg.toolPackage "exo-nixos"} preflight --config ${configFile}";
        ExecStart = "${lib.getExe' cfg.toolPackage "exo-nixos"} run --config ${configFile} --role ${if cfg.mode == "master" then "master" else "worker"}";
        Restart = "always";
        LimitNOFILE = 65535;
      };
    };
  };
}
