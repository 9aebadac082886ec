# services.exo: the EXO node as a systemd service, and the config document every exo-nixos
# command reads (/etc/exo/config.json, schemaVersion 1). Behaviour lives in the Python tool.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkEnableOption mkPackageOption mkOption mkIf types literalExpression;
  cfg = config.services.exo;
  json = pkgs.formats.json { };
  exoTypes = import ./lib/types.nix { inherit lib; };
  inherit (exoTypes) absolutePath;
  # config.json is judged by the model that reads it, exo-nixos' own (`config validate`, run
  # from the build platform's package), as nixpkgs' prometheus module checks its file with
  # promtool: a document the tool would refuse at start fails the build, with its reasons.
  configFile =
    pkgs.runCommandLocal "exo-config.json"
      {
        document = json.generate "exo-config-unchecked.json" cfg.configDocument;
        nativeBuildInputs = [ pkgs.buildPackages.exo-nixos ];
      }
      ''
        exo-nixos config validate --quiet --name services.exo "$document"
        cp "$document" "$out"
      '';
  role = if cfg.mode == "master" then "master" else "worker";
  # hardware.nodePerGpu (exo-hardware.nix): the node unit is a template, one instance per GPU
  # group, each named after its GPUs' device minors (gpu0, gpu2-3)
  perGpu = cfg.hardware.nodePerGpu.enable or false;
  instanceNames = map (group: "gpu${lib.concatMapStringsSep "-" toString group}")
    (cfg.hardware.nodePerGpu.groups or [ ]);
  nodeUnit = if perGpu then "exo-${role}@" else "exo-${role}";
  nodeServices =
    if perGpu then map (name: "${nodeUnit}${name}.service") instanceNames
    else [ "${nodeUnit}.service" ];
  # a template's own settings name its instance with %i
  instanceArgs = lib.optionalString perGpu " --instance %i";
  instanceDir = root: dir: relative root dir + lib.optionalString perGpu " ${relative root dir}/instances/%i";
  exoNixos = lib.getExe' cfg.toolPackage "exo-nixos";
  sec = cfg.security;
  hardening = import ./lib/hardening.nix;

  # systemd manages (creates, chowns, makes writable) directories below these roots itself;
  # a directory elsewhere is created by tmpfiles and made writable with ReadWritePaths.
  managed = root: dir: lib.hasPrefix "${root}/" dir;
  relative = root: dir: lib.removePrefix "${root}/" dir;
  stateManaged = managed "/var/lib" sec.dataDir;
  cacheManaged = managed "/var/cache" sec.cacheDir;
  runtimeManaged = managed "/run" sec.runtimeDir;
  configManaged = managed "/etc" sec.configDir;
  paths = import ./lib/paths.nix { inherit lib; };
  inherit (paths) inside;
  modelsDir = paths.modelsDir cfg;
  # writable directories the service needs beyond its own managed ones
  unmanagedDirs =
    lib.optional (!stateManaged) sec.dataDir
    ++ lib.optional (!cacheManaged) sec.cacheDir
    ++ lib.optional (!runtimeManaged) sec.runtimeDir;
  writableModelDirs = lib.filter (d: !(inside sec.dataDir d)) ([ modelsDir ] ++ cfg.extraModelDirs);
  homeRoots = [ "/home" "/root" "/run/user" ];
  underHome = dir: lib.any (root: inside root dir) homeRoots;
  modelsUnderHome = lib.any underHome (writableModelDirs ++ cfg.readOnlyModelDirs);
  # Homes the service user cannot enter: /root, and those NixOS creates with a homeMode that
  # gives others no search (x) bit ("700" by default, nixos/modules/config/users-groups.nix).
  searchable = mode: builtins.match ".*[1357]" mode != null;
  closedHomes = [ { name = "root"; home = "/root"; mode = "700"; } ] ++ lib.mapAttrsToList
    (name: u: { inherit name; inherit (u) home; mode = u.homeMode or "700"; })
    (lib.filterAttrs
      (name: u: name != sec.user && (u.isNormalUser || u.createHome) && !searchable (u.homeMode or "700"))
      config.users.users);
  modelDirOptions =
    lib.optional (cfg.modelsDir != null) { option = "modelsDir"; dir = cfg.modelsDir; }
    ++ map (dir: { option = "extraModelDirs"; inherit dir; }) cfg.extraModelDirs
    ++ map (dir: { option = "readOnlyModelDirs"; inherit dir; }) cfg.readOnlyModelDirs;
  closedHomeOf = dir: lib.findFirst (h: h.home != "/" && inside h.home dir) null closedHomes;
  unreachableModelDirs = lib.filter (d: closedHomeOf d.dir != null) modelDirOptions;
  # under /home or /run/user but in no home NixOS declares: whether exo can enter is unknown here
  declaredHome = dir: lib.any (u: u.home != "/" && inside u.home dir) (lib.attrValues config.users.users);
  unknownHomeModelDirs = lib.filter (d: underHome d.dir && closedHomeOf d.dir == null && !declaredHome d.dir) modelDirOptions;

  hc = cfg.healthCheck;
  # pings follow passing probes; this many milliseconds without one means EXO is hung
  watchdogMs = builtins.ceil ((hc.intervalSec * hc.failures + hc.timeoutSec) * 1000);
  stopGraceSec = cfg.timeouts.stopSec - 5;
in
{
  imports = [ ./exo-caches.nix ];

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
      type = exoTypes.mode;
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
      type = types.nullOr exoTypes.clusterNamespace;
      default = null;
      example = "rack-a";
      description = ''
        EXO `--namespace`: only nodes with the same namespace see each other. `null` keeps
        EXO's default, the version in its `pyproject.toml` (`0.3.70` at the pinned commit),
        which does not change with every EXO build: set a name per cluster to keep clusters on
        one segment apart.
      '';
    };

    logLevel = mkOption {
      type = exoTypes.logLevel;
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
        # at most 100: the config model's bound, checked when config.json is built
        type = types.ints.positive;
        default = 3;
        description = "Consecutive failed probes before the node counts as down.";
      };
    };

    security = {
      user = mkOption {
        type = exoTypes.userName;
        default = "exo";
        description = "System user the EXO units run as (created when left at `exo`).";
      };
      group = mkOption {
        type = exoTypes.userName;
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

    restart = {
      delaySec = mkOption {
        type = types.ints.between 1 3600;
        default = 1;
        description = "Delay before the first automatic restart of the node (`RestartSec`).";
      };
      maxDelaySec = mkOption {
        type = types.ints.between 1 86400;
        default = 300;
        description = ''
          Longest delay between restarts (`RestartMaxDelaySec`): delays grow exponentially
          from {option}`services.exo.restart.delaySec` to this over
          {option}`services.exo.restart.steps` restarts. systemd resets the count
          (`NRestarts`) only when the unit is started or restarted by hand.
        '';
      };
      steps = mkOption {
        type = types.ints.between 1 100;
        default = 8;
        description = "Restarts over which the delay grows to its maximum (`RestartSteps`).";
      };
    };

    timeouts = {
      startSec = mkOption {
        type = types.ints.between 1 86400;
        default = 300;
        description = ''
          Time from start until EXO's API answers (the supervisor then sends READY=1) before
          systemd gives up and restarts the node (`TimeoutStartSec`).
        '';
      };
      stopSec = mkOption {
        type = types.ints.between 10 3600;
        default = 30;
        description = ''
          Stop timeout (`TimeoutStopSec`). The supervisor gives EXO five seconds less after
          SIGTERM before it kills EXO's processes, so systemd never has to.
        '';
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
      description = ''
        Name of this host's EXO node unit: `exo-master` or `exo-worker`, or the template
        `exo-worker@` with {option}`services.exo.hardware.nodePerGpu`.
      '';
    };

    nodeServices = mkOption {
      type = types.listOf types.str;
      readOnly = true;
      internal = true;
      default = nodeServices;
      description = ''
        The node's unit files to order after: `exo-worker.service`, or one
        `exo-worker@gpuN.service` per GPU group.
      '';
    };
  };

  config = mkIf cfg.enable {
    # Only the checks that need NixOS context are assertions; the config contract's own rules
    # are the config model's, judged when configFile is built.
    assertions = [
      {
        assertion = configManaged;
        message = ''services.exo.security.configDir = "${sec.configDir}": it must lie below /etc, where NixOS writes config.json; use for example "/etc/exo".'';
      }
    ] ++ map (d:
      let home = closedHomeOf d.dir; in {
        assertion = false;
        message = ''services.exo.${d.option}: "${d.dir}" lies in ${home.home}, the home of ${home.name} (mode ${home.mode}), which the ${sec.user} user cannot enter, so EXO could never ${if d.option == "readOnlyModelDirs" then "read" else "use"} it. Keep models outside home directories (e.g. "/srv/models"), or bind-mount them there: fileSystems."/srv/models" = { device = "${d.dir}"; options = [ "bind" ]; };'';
      }) unreachableModelDirs;

    warnings = map (d: ''services.exo.${d.option}: "${d.dir}" lies under a home directory that users.users does not declare; NixOS creates homes with mode 700, which the ${sec.user} user cannot enter. Keep models outside home directories (e.g. "/srv/models"); the pre-flight check fails at start if the directory cannot be reached.'') unknownHomeModelDirs;

    services.exo.configDocument = {
      schemaVersion = 1;
      inherit (cfg)
        mode noWorker apiPort clusterNamespace logLevel offline modelsDir extraModelDirs
        readOnlyModelDirs extraArgs environmentVariables healthCheck security;
    };

    environment.etc."${relative "/etc" sec.configDir}/config.json".source = configFile;
    environment.systemPackages = [ cfg.toolPackage ];

    users.users = mkIf (sec.user == "exo") {
      exo = {
        isSystemUser = true;
        group = sec.group;
        home = sec.dataDir;
        description = "EXO distributed inference";
      };
    };
    users.groups = mkIf (sec.group == "exo") { exo = { }; };

    systemd.targets.exo = {
      description = "EXO distributed AI inference";
      wantedBy = [ "multi-user.target" ];
      wants = nodeServices;
    };

    systemd.services.${nodeUnit} = {
      description = "EXO ${role} node";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      partOf = [ "exo.target" ];
      # a template is wanted through its instances (exo.target's Wants=)
      wantedBy = lib.optionals (!perGpu) [ "exo.target" ];
      restartTriggers = [ configFile ];
      # no start rate limit: the exponential backoff below paces restarts forever
      startLimitIntervalSec = 0;
      # the shared sandbox (lib/hardening.nix); this unit's differences close the set
      serviceConfig = hardening // {
        # the supervisor sends READY=1 once EXO's API answers, WATCHDOG=1 while probes pass
        Type = "notify";
        NotifyAccess = "main";
        ExecStartPre = "${exoNixos} preflight --config ${configFile}${instanceArgs}";
        ExecStart = "${exoNixos} run --config ${configFile} --role ${role} --stop-timeout ${toString stopGraceSec}${instanceArgs}";
        User = sec.user;
        Group = sec.group;

        Restart = "always";
        RestartSec = cfg.restart.delaySec;
        RestartSteps = cfg.restart.steps;
        RestartMaxDelaySec = cfg.restart.maxDelaySec;
        WatchdogSec = "${toString watchdogMs}ms";
        TimeoutStartSec = cfg.timeouts.startSec;
        TimeoutStopSec = cfg.timeouts.stopSec;
        # SIGTERM to the supervisor only; it stops EXO and its runners, SIGKILL for leftovers
        KillMode = "mixed";
        LimitNOFILE = 65535;
        SyslogIdentifier = if perGpu then "${nodeUnit}%i" else nodeUnit;
        # the supervisor starts each line with <N>, the syslog priority of its level, so
        # journalctl -p works; logLevel decides which lines it writes
        SyslogLevelPrefix = true;

        # with a node per GPU each instance also gets <dir>/instances/<name> (the supervisor's
        # instance_dirs): EXO keeps one node per cache directory
        StateDirectory = lib.mkIf stateManaged (instanceDir "/var/lib" sec.dataDir);
        StateDirectoryMode = "0750";
        CacheDirectory = lib.mkIf cacheManaged (instanceDir "/var/cache" sec.cacheDir);
        CacheDirectoryMode = "0750";
        RuntimeDirectory = lib.mkIf runtimeManaged
          (relative "/run" sec.runtimeDir + lib.optionalString perGpu "/%i");
        RuntimeDirectoryMode = "0750";
        # holds config.json, which has no secrets (those come from environmentFile)
        ConfigurationDirectory = lib.mkIf configManaged (relative "/etc" sec.configDir);
        ConfigurationDirectoryMode = "0755";
        ReadWritePaths = unmanagedDirs ++ writableModelDirs;
        # "-": a missing read-only model dir (an unmounted share) does not block the start;
        # the pre-flight reports it
        ReadOnlyPaths = map (d: "-${d}") cfg.readOnlyModelDirs;
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) cfg.environmentFile;

        # hardening beyond the baseline: everything EXO tolerates; each relaxation says why
        # devices: exo-hardware.nix sets DevicePolicy=closed, DeviceAllow= for the GPU nodes
        # of the installed variants, and PrivateDevices= (true on CPU-only nodes); it also
        # turns hardware.memoryLimit into MemoryMax=
        # model directories under /home stay reachable (read-only unless listed as writable)
        ProtectHome = if modelsUnderHome then "read-only" else true;
        # relaxed: EXO reads /proc/meminfo, /proc/cpuinfo and /proc/stat for placement
        ProcSubset = "all";
        # relaxed: CUDA's PTX JIT and libffi closures (ctypes callbacks in the Python ML
        # stack) need memory that is writable and executable
        MemoryDenyWriteExecute = false;
        # AF_NETLINK: EXO enumerates interfaces and their IPv6 addresses (discovery joins
        # multicast on each) and the supervisor watches the cluster link through rtnetlink;
        # AF_UNIX: sd_notify and the journal
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        # relaxed: EXO is a network service (zenoh, discovery, API, MLX ring); a network
        # namespace for the whole unit is exo-networking.nix's choice
        PrivateNetwork = false;
      };
    };

    systemd.tmpfiles.rules =
      map (d: "d ${d} 0750 ${sec.user} ${sec.group} - -") (unmanagedDirs ++ writableModelDirs)
      # a node per GPU: each instance's RuntimeDirectory is <runtimeDir>/<name>, and systemd
      # would make their parent root's; it stays, since no instance may remove it for all
      ++ lib.optional (perGpu && runtimeManaged) "d ${sec.runtimeDir} 0750 ${sec.user} ${sec.group} - -";
  };
}
