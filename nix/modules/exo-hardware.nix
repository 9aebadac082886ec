# services.exo.hardware: which accelerator EXO uses and the device access its unit gets.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf mkDefault types literalExpression;
  cfg = config.services.exo;
  hw = cfg.hardware;

  # Accelerators whose EXO variant is installed: the runtime decision (exo-nixos detect)
  # picks one of them at every start, so the node unit gets the device access of each, and
  # nothing more. A preferred accelerator without a variant can never run (a warning says
  # so): it gets no devices, but its settings are still checked (`uses`).
  installed = lib.attrNames hw.packages;
  wanted = lib.unique (installed
    ++ lib.optional (hw.preferredAccelerator != null) hw.preferredAccelerator);
  uses = accelerator: lib.elem accelerator wanted;

  # What each accelerator needs from the host. Names are /proc/devices entries: the nvidia
  # driver registers nvidia-frontend (nvidiactl, nvidia0..N), nvidia-uvm and nvidia-caps (MIG);
  # amdgpu registers kfd; render nodes are drm. NixOS creates /dev/nvidia* with mode 0666, so
  # CUDA needs no group; /dev/kfd and /dev/dri/renderD* belong to the render group.
  access = {
    cuda = {
      devices = [ "char-nvidiactl rw" "char-nvidia-frontend rw" "char-nvidia-uvm rw" "char-nvidia-caps rw" ];
      groups = [ ];
    };
    # one node per GPU: the shared control nodes here, each instance's /dev/nvidiaN in its own
    # drop-in (char-nvidia-frontend would open every GPU)
    cudaPerGpu = { devices = sharedNvidia; groups = [ ]; };
    rocm = {
      devices = [ "char-kfd rw" "char-drm rw" ];
      groups = [ "render" ];
    };
    mlx = { devices = [ ]; groups = [ ]; };
    cpu = { devices = [ ]; groups = [ ]; };
  };
  needed = field: lib.unique (lib.concatMap
    (a: (access.${if a == "cuda" && perGpu then "cudaPerGpu" else a} or { }).${field} or [ ])
    installed);
  deviceAllow = needed "devices";
  groups = needed "groups";
  gpu = deviceAllow != [ ];

  nvidiaDriver = lib.elem "nvidia" config.services.xserver.videoDrivers
    || config.hardware.nvidia.datacenter.enable;
  # the configured driver's version, when the driver is configured and its package says
  nvidiaVersion = if nvidiaDriver then config.hardware.nvidia.package.version or null else null;
  driverTooOld = uses "cuda" && nvidiaVersion != null && hw.cudaMinimumDriver != null
    && lib.versionOlder nvidiaVersion hw.cudaMinimumDriver;
  persistenced = nvidiaDriver && config.hardware.nvidia.nvidiaPersistenced;
  # the data-center driver line (fabric manager, persistenced) has packages of its own:
  # nvidiaPackages.latest is a desktop driver
  newerDriver =
    if config.hardware.nvidia.datacenter.enable then
      "Use a newer data-center driver, e.g. hardware.nvidia.package = config.boot.kernelPackages.nvidiaPackages.dc_580 where nixpkgs has it, or one built with nvidiaPackages.mkDriver."
    else
      "Use a newer driver, e.g. hardware.nvidia.package = config.boot.kernelPackages.nvidiaPackages.latest.";
  # what the installed CUDA variant says it needs (nix/packages: passthru.variant)
  cudaRequirements = hw.packages.cuda.passthru.variant.requirements or { };

  exoTypes = import ./lib/types.nix { inherit lib; };
  # The syntax exo-nixos' config model accepts (patterns.json): a percentage or a size in
  # binary units; groups: number, fraction, "%" or unit with suffix, unit, suffix.
  memoryLimitParts = text: builtins.match exoTypes.patterns.memoryLimit.pattern text;
  memoryLimitValue = import ./lib/memory-limit.nix { inherit lib; };
  # "80 %" -> "80%", "64GiB" -> "64G", "1.5t" -> "1.5T": the forms systemd's MemoryMax= takes.
  memoryMax = text:
    let
      parts = memoryLimitParts text;
      unit = if builtins.elemAt parts 2 == "%" then "%" else lib.toUpper (builtins.elemAt parts 3);
    in
    "${builtins.elemAt parts 0}${unit}";
  # One node per GPU group (nodePerGpu): the node unit is the template exo-worker@; each
  # instance gets a drop-in with its own GPUs' device nodes, its memory share and its network
  # namespace. The template keeps only what every instance shares: the NVIDIA control nodes.
  perGpu = hw.nodePerGpu.enable;
  gpuGroups = hw.nodePerGpu.groups;
  instanceName = group: "gpu${lib.concatMapStringsSep "-" toString group}";
  exoNixos = lib.getExe' cfg.toolPackage "exo-nixos";
  sharedNvidia = [ "/dev/nvidiactl rw" "char-nvidia-uvm rw" "char-nvidia-caps rw" ];
  # memoryLimit split between the instances, in the forms MemoryMax= takes: whole percent
  # (rounded down) or bytes
  memoryShare = text: count:
    let value = memoryLimitValue text; in
    if value ? percent then "${toString (lib.max 1 (builtins.floor (value.percent / count)))}%"
    else toString (builtins.floor (value.bytes / count));
  clusterLink = cfg.networking.bondInterface or null;
  linkDevice = "sys-subsystem-net-devices-${lib.strings.escapeC (lib.stringToCharacters "!\"#$%&'()*+,;<=>=@[\\]^`{|}~-") (toString clusterLink)}.device";
  # the instance-net units make namespaces and links as root: nothing else
  netnsHardening = {
    Type = "oneshot";
    RemainAfterExit = true;
    CapabilityBoundingSet = [ "CAP_SYS_ADMIN" "CAP_NET_ADMIN" ];
    NoNewPrivileges = true;
    RestrictNamespaces = "net mnt";
    RestrictAddressFamilies = [ "AF_NETLINK" "AF_UNIX" ];
    IPAddressDeny = "any";
    DevicePolicy = "closed";
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "@mount" "setns" "unshare" ];
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    ProtectClock = true;
    ProtectHostname = true;
    RemoveIPC = true;
    # `ip netns add` makes /run/netns when it is missing: 0755, so each node's own pre-flight
    # (as the exo user) can look at its namespace there
    UMask = "0022";
  };

  gpuUnits = [ "systemd-modules-load.service" ]
    ++ lib.optional hw.waitForDeviceNodes "systemd-udev-settle.service"
    ++ lib.optional (uses "cuda" && persistenced) "nvidia-persistenced.service";
in
{
  imports = [
    ./exo-service.nix
    # upstream EXO has no ROCm backend, so the override could only warn that it did nothing
    (lib.mkRemovedOptionModule [ "services" "exo" "hardware" "rocmGfxOverride" ] ''
      Upstream EXO has no ROCm backend, so HSA_OVERRIDE_GFX_VERSION never reached a GPU. For an EXO build that has one, set services.exo.environmentVariables.HSA_OVERRIDE_GFX_VERSION.'')
  ];

  options.services.exo.hardware = {
    autoDetect = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Choose the accelerator at every start from what is detected and which EXO variants
        are installed; a GPU that is gone or not answering means the CPU variant.
      '';
    };

    preferredAccelerator = mkOption {
      type = types.nullOr exoTypes.accelerator;
      default = null;
      example = "cuda";
      description = ''
        Use this accelerator when it works on the host. Upstream EXO has CUDA, MLX (Apple)
        and CPU backends only: `rocm` is accepted but EXO then runs on the CPU, and says so.
      '';
    };

    memoryLimit = mkOption {
      type = types.nullOr exoTypes.memoryLimit;
      default = null;
      example = "80%";
      description = ''
        Memory EXO may use: a share of physical memory (`"80%"`) or a size (`"48G"`). Sets the
        unit's `MemoryMax` and the memory EXO plans with (`OVERRIDE_MEMORY_MB`).
      '';
    };

    packages = mkOption {
      type = types.attrsOf types.package;
      default = { };
      defaultText = literalExpression "{ cpu = config.services.exo.package; }";
      example = literalExpression "{ cuda = pkgs.exo-cuda; }";
      description = ''
        Installed EXO variants by accelerator (`cuda`, `rocm`, `mlx`, `cpu`); the supervisor
        runs the one chosen at start. `cpu` is always there, {option}`services.exo.package`
        unless set here, since EXO falls back to it when no GPU works; so
        `{ cuda = pkgs.exo-cuda; }` installs the CUDA variant next to it. Each accelerator
        listed also gets its device access in the node unit.
      '';
    };

    visibleDevices = mkOption {
      type = types.nullOr (types.listOf exoTypes.deviceId);
      default = null;
      example = [ "0" "1" ];
      description = "GPU indices or UUIDs EXO may use (`CUDA_VISIBLE_DEVICES`); `null`: all.";
    };

    waitForDeviceNodes = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Start EXO only after `systemd-udev-settle.service`. NixOS creates `/dev/nvidia-uvm`
        from a udev rule once `nvidia_uvm` is loaded; on hosts where EXO still starts before
        the node exists (and so falls back to the CPU), this closes the race at the cost of a
        slower boot. With `hardware.nvidia.nvidiaPersistenced` the node unit is ordered after
        `nvidia-persistenced.service` anyway.
      '';
    };

    cudaMinimumDriver = mkOption {
      type = types.nullOr exoTypes.driverVersion;
      default = cudaRequirements.nvidiaDriver or null;
      defaultText = literalExpression
        "config.services.exo.hardware.packages.cuda.passthru.variant.requirements.nvidiaDriver or null";
      example = "580";
      description = ''
        Oldest NVIDIA driver the installed CUDA variant of EXO runs on. When the loaded driver
        is older, the node starts on the CPU and says why, instead of failing in CUDA's start-up.
        The default comes from the CUDA package (`exo-cuda`, built with CUDA 13: 580); set it
        for a CUDA build of your own.
      '';
    };

    cudaMinimumComputeCapability = mkOption {
      type = types.nullOr exoTypes.computeCapability;
      default = cudaRequirements.computeCapability or null;
      defaultText = literalExpression
        "config.services.exo.hardware.packages.cuda.passthru.variant.requirements.computeCapability or null";
      example = "7.5";
      description = ''
        Oldest GPU generation (CUDA compute capability) the installed CUDA variant runs on;
        older GPUs are left out, and a node with only such GPUs runs on the CPU. The default
        comes from the CUDA package (MLX's CUDA builds: 7.5, Turing).
      '';
    };

    nodePerGpu = {
      enable = lib.mkEnableOption ''
        one EXO node per NVIDIA GPU (or per group of GPUs): an EXO process computes on one
        GPU, so a host with several runs a node for each. Each node is an instance of
        `exo-worker@.service` (`exo-worker@gpu0.service`, ...) with only its own GPUs' device
        nodes, its GPU's memory, its own directories and its own network namespace with a
        macvlan on {option}`services.exo.networking.bondInterface`'';

      gpus = mkOption {
        type = types.listOf (types.ints.between 0 255);
        default = [ ];
        example = [ 0 1 2 3 4 5 6 7 ];
        description = ''
          NVIDIA device minors (`/dev/nvidia<N>`, `Device Minor` in
          `/proc/driver/nvidia/gpus/*/information`) of the GPUs to run a node on, one each.
        '';
      };

      groups = mkOption {
        type = types.listOf (types.nonEmptyListOf (types.ints.between 0 255));
        default = map (minor: [ minor ]) hw.nodePerGpu.gpus;
        defaultText = literalExpression "map (minor: [ minor ]) config.services.exo.hardware.nodePerGpu.gpus";
        example = [ [ 0 1 ] [ 2 3 ] ];
        description = "GPU groups by device minor, one node each (EXO computes on the first).";
      };

      cpuFallback = mkOption {
        type = types.bool;
        default = false;
        description = ''
          A node whose GPUs are gone or broken runs on the CPU instead of staying down (its
          unit then fails and systemd retries with its backoff). The other nodes are never
          affected.
        '';
      };

      addresses = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "10.0.0.11/24" "10.0.0.12/24" ];
        description = ''
          Each node's IPv4 address with prefix on the cluster link, in group order (EXO's API
          listens on IPv4 only). Empty: an IPv4 link-local address per node, derived from
          `/etc/machine-id`.
        '';
      };
    };
  };

  config = mkIf cfg.enable (lib.mkMerge [ {
    assertions = [
      {
        assertion = hw.packages ? cpu;
        message = ''services.exo.hardware.packages needs a "cpu" variant: EXO falls back to it when no GPU works; set services.exo.hardware.packages.cpu = pkgs.exo-complete.'';
      }
    ];

    warnings =
      lib.optional (uses "cuda" && !nvidiaDriver) ''
        services.exo.hardware: CUDA is wanted (preferredAccelerator or packages.cuda) but no NVIDIA driver is configured, so EXO will run on the CPU. Add "nvidia" to services.xserver.videoDrivers (desktops) or set hardware.nvidia.datacenter.enable = true (servers).''
      ++ lib.optional (uses "cuda" && nvidiaDriver && !config.hardware.graphics.enable) ''
        services.exo.hardware: CUDA programs on NixOS load libcuda from /run/opengl-driver, which only hardware.graphics.enable = true provides; set it, or EXO will run on the CPU.''
      ++ lib.optional driverTooOld ''
        services.exo.hardware: the NVIDIA driver configured (hardware.nvidia.package, ${toString nvidiaVersion}) is older than ${toString hw.cudaMinimumDriver}, the oldest the CUDA variant of EXO runs on, so EXO will run on the CPU. ${newerDriver}''
      ++ lib.optional (hw.preferredAccelerator != null && hw.preferredAccelerator != "cpu" && !(hw.packages ? ${hw.preferredAccelerator})) ''
        services.exo.hardware.preferredAccelerator is "${hw.preferredAccelerator}" but services.exo.hardware.packages has no ${hw.preferredAccelerator} variant, so it can never be chosen; add services.exo.hardware.packages.${hw.preferredAccelerator}.''
      ++ lib.optional (uses "rocm") ''
        services.exo.hardware: upstream EXO has no ROCm backend, so AMD GPUs are not used and EXO runs on the CPU; the rocm settings only take effect with an EXO build that has one.''
      ++ lib.optional (uses "mlx") ''
        services.exo.hardware: MLX's GPU backend needs Metal (macOS); on NixOS the mlx accelerator is never available and EXO runs on the CPU. Remove it from preferredAccelerator and packages.''
      ++ lib.optional (hw.visibleDevices != null && !(uses "cuda" || uses "rocm")) ''
        services.exo.hardware.visibleDevices has no effect: no cuda or rocm variant is installed or preferred.'';

    services.exo.hardware.packages.cpu = mkDefault cfg.package;

    # every option is a key of the contract but those only this module uses (and the retired
    # one, whose value cannot be read); packages as their store paths
    services.exo.configDocument.hardware =
      removeAttrs hw [ "waitForDeviceNodes" "rocmGfxOverride" ]
      // {
        packages = lib.mapAttrs (_: toString) hw.packages;
        # gpus only fills the groups' default
        nodePerGpu = removeAttrs hw.nodePerGpu [ "gpus" ];
      };

    # nixpkgs' NVIDIA module lists nvidia-uvm in boot.kernelModules, loaded by
    # systemd-modules-load.service; units that start earlier find no /dev/nvidia-uvm.
    systemd.services.${cfg.nodeUnit} = {
      after = lib.optionals gpu gpuUnits;
      wants = lib.optionals gpu gpuUnits;
      serviceConfig = {
        DevicePolicy = mkDefault "closed";
        # a private /dev would hide the GPUs; a CPU-only node needs no host device at all
        PrivateDevices = mkDefault (!gpu);
        MemoryMax = mkIf (hw.memoryLimit != null) (mkDefault (memoryMax hw.memoryLimit));
      } // lib.optionalAttrs gpu {
        DeviceAllow = deviceAllow;
      } // lib.optionalAttrs (groups != [ ]) {
        SupplementaryGroups = groups;
      };
    };
  }

  (mkIf perGpu {
    warnings = lib.optional (!(uses "cuda")) ''
      services.exo.hardware.nodePerGpu is on but no cuda variant is installed (services.exo.hardware.packages.cuda): every node runs on the CPU${lib.optionalString (!hw.nodePerGpu.cpuFallback) ", or rather stays down, since cpuFallback is off"}.'';

    # each instance: its GPUs' device nodes, its memory share, its namespace (made by
    # exo-netns@<name>.service); drop-ins on the template exo-worker@.service
    systemd.services = lib.listToAttrs (map (group:
      let name = instanceName group; in
      lib.nameValuePair "${cfg.nodeUnit}${name}" {
        overrideStrategy = "asDropin";
        requires = [ "exo-netns@${name}.service" ];
        after = [ "exo-netns@${name}.service" ];
        serviceConfig = {
          NetworkNamespacePath = "/run/netns/exo-${name}";
          DeviceAllow = map (minor: "/dev/nvidia${toString minor} rw") group;
        } // lib.optionalAttrs (hw.memoryLimit != null) {
          MemoryMax = memoryShare hw.memoryLimit (lib.length gpuGroups);
        };
      }) gpuGroups) // {
      # exo-netns@gpu0.service: the namespace exo-gpu0 with a macvlan on the cluster interface
      "exo-netns@" = {
        description = "Network namespace and cluster link of EXO node %i";
        bindsTo = [ linkDevice ];
        after = [ linkDevice ];
        before = [ "${cfg.nodeUnit}%i.service" ];
        # a switch that only changes this unit must not pull the link from under a node
        restartIfChanged = false;
        serviceConfig = netnsHardening // {
          ExecStart = "${exoNixos} instance-net up --config ${cfg.configFile} --instance %i";
          ExecStop = "${exoNixos} instance-net down --config ${cfg.configFile} --instance %i";
        };
      };
      # the host's own macvlan to reach its nodes (a macvlan child cannot reach its parent)
      exo-host-link = {
        description = "The host's link to its EXO nodes on the cluster interface";
        bindsTo = [ linkDevice ];
        after = [ linkDevice ];
        partOf = [ "exo.target" ];
        wantedBy = [ "exo.target" ];
        restartIfChanged = false;
        serviceConfig = netnsHardening // {
          ExecStart = "${exoNixos} instance-net host --config ${cfg.configFile}";
        };
      };
    };
    systemd.targets.exo.wants = [ "exo-host-link.service" ];
  })
  ]);
}
