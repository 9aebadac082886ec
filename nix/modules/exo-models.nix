# services.exo.models: the models the cluster keeps downloaded and running, and
# exo-models.service, which converges the cluster to them (`exo-nixos models reconcile`,
# src/exo_nixos/models/reconcile.py; docs/models.md).
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf types literalExpression;
  cfg = config.services.exo;
  rec' = cfg.modelReconciler;
  exoTypes = import ./lib/types.nix { inherit lib; };
  inherit (exoTypes) absolutePath;
  exe = lib.getExe' cfg.toolPackage "exo-nixos";
  networkService = import ./lib/network-service.nix;
  sec = cfg.security;
  netns = cfg.networking.networkNamespace;
  paths = import ./lib/paths.nix { inherit lib; };
  inherit (paths) inside;
  modelsDir = paths.modelsDir cfg;
  quarantineDir = if rec'.quarantineDir == null then "${sec.dataDir}/quarantine" else rec'.quarantineDir;
  # what a repair writes: the writable model dirs and the quarantine (the data dir holds the
  # defaults), and the runtime dir for the lock that keeps two reconcilers on a host apart
  writable = lib.unique ([ sec.dataDir sec.runtimeDir modelsDir quarantineDir ] ++ cfg.extraModelDirs);
  runReconciler = cfg.enable && rec'.enable && cfg.models != { };

  modelType = types.submodule {
    options = {
      running = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Keep one instance of the model running on the cluster. `false`: keep it downloaded
          on the nodes a placement would use, without an instance.
        '';
      };
      sharding = mkOption {
        type = types.enum [ "Pipeline" "Tensor" ];
        default = "Pipeline";
        description = "Upstream's placement `sharding` (`Tensor` only for models that support it).";
      };
      instanceMeta = mkOption {
        type = types.enum [ "MlxRing" "MlxJaccl" ];
        default = "MlxRing";
        description = ''
          Upstream's `instance_meta`: `MlxRing` (TCP between nodes). `MlxJaccl` (RDMA over
          Thunderbolt) runs on macOS nodes only.
        '';
      };
      minNodes = mkOption {
        type = types.ints.between 1 1024;
        default = 1;
        description = "Upstream's `min_nodes`: the fewest nodes to spread the model over.";
      };
      custom = mkOption {
        type = types.bool;
        default = false;
        description = ''
          The model is not in EXO's catalogue: add its card from Hugging Face first
          (upstream's `POST /models/add`). Needs the hub, so not with `offline`.
        '';
      };
    };
  };
in
{
  imports = [ ./exo-service.nix ];

  options.services.exo = {
    models = mkOption {
      type = types.attrsOf modelType;
      default = { };
      example = literalExpression ''
        {
          "mlx-community/Llama-3.2-1B-Instruct-4bit" = { };
          "mlx-community/Qwen3-0.6B-4bit" = { running = false; };
        }
      '';
      description = ''
        Models by EXO model id (a Hugging Face repository, `owner/name`) that the cluster
        keeps: `exo-models.service` places what is declared running and missing, downloads
        the rest, deletes duplicate instances of a declared model and replaces instances that
        never become ready. Declare the same models on every node: only the node that is the
        elected master acts, so the set survives a change of master. Models not declared
        here are left alone.
      '';
    };

    modelReconciler = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Run `exo-models.service` when {option}`services.exo.models` is not empty.";
      };
      intervalSec = mkOption {
        type = types.numbers.between 0.1 86400;
        default = 30;
        description = "Seconds between comparisons of the declared models with the cluster once converged.";
      };
      placeTimeoutSec = mkOption {
        type = types.numbers.between 1 86400;
        default = 900;
        description = ''
          Seconds a placed instance may take to appear and become ready (downloads included)
          before it is deleted and placed again.
        '';
      };
      repairCache = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Before placing a model, check its files in this node's model cache (no hashing) and
          move damaged ones to {option}`services.exo.modelReconciler.quarantineDir`, so EXO
          downloads them again.
        '';
      };
      quarantineDir = mkOption {
        type = types.nullOr absolutePath;
        default = null;
        example = "/srv/models-quarantine";
        description = ''
          Where damaged model files are moved (never deleted); `null` means
          `''${security.dataDir}/quarantine`. On the file system of the model dirs, a move is
          a rename.
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    services.exo.configDocument = {
      inherit (cfg) models;
      modelReconciler = {
        inherit (rec') enable intervalSec placeTimeoutSec repairCache quarantineDir;
      };
    };

    systemd.targets.exo.wants = lib.optional runReconciler "exo-models.service";

    systemd.services.exo-models = mkIf runReconciler {
      description = "EXO declared models (places, downloads and repairs what services.exo.models says)";
      after = cfg.nodeServices;
      requires = cfg.nodeServices;  # one node: nodePerGpu is refused with models (config.py)
      partOf = [ "exo.target" ];
      wantedBy = [ "exo.target" ];
      restartTriggers = [ cfg.configFile ];
      # no start rate limit: the exponential backoff below paces restarts forever
      startLimitIntervalSec = 0;
      serviceConfig = networkService // {
        # READY=1 at once (it must not hold up boot while the cluster forms), STATUS= per pass
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${exe} models reconcile --config ${cfg.configFile}";
        User = sec.user;
        Group = sec.group;
        # the reconciler retries failures itself; a crash restarts it, slower each time
        Restart = "always";
        RestartSec = 2;
        RestartSteps = 6;
        RestartMaxDelaySec = 120;
        SyslogIdentifier = "exo-models";
        SyslogLevelPrefix = true;
        # "-": the node unit creates these; a missing one must not block the start
        ReadWritePaths = map (d: "-${d}") writable;
        # model dirs under /home as the node unit sees them
        ProtectHome = config.systemd.services.${cfg.nodeUnit}.serviceConfig.ProtectHome;
        # the node API is on this host (in the EXO network namespace when there is one)
        NetworkNamespacePath = mkIf (netns != null) "/run/netns/${netns}";
      };
    };

    systemd.tmpfiles.rules = lib.optional (runReconciler && !(inside sec.dataDir quarantineDir))
      "d ${quarantineDir} 0750 ${sec.user} ${sec.group} - -";
  };
}
