# Declarations of the NixOS options the exo modules set or read, as nixpkgs (nixos-25.11)
# declares them: the same types (and so merge behaviour), defaults and the assertions that
# shape them, so a definition NixOS refuses fails here too. Only what the modules and their
# tests touch; not a NixOS replacement. Each block names the nixpkgs file it mirrors.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkDefault types;

  # nixos/lib/systemd-lib.nix
  unitNameType = types.strMatching
    "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  assertValueOneOf = name: values: group: attr:
    lib.optional (attr ? ${name} && !lib.elem attr.${name} values)
      "Systemd ${group} field `${name}' cannot have value `${toString attr.${name}}'.";
  # applied to each definition of the whole attribute set, so mkIf/mkOverride are unwrapped
  checkUnitConfig = group: checks: attrs:
    let
      defs = lib.mapAttrs (_: v: if lib.elem (v._type or "") [ "override" "if" ] then v.content else v) attrs;
      errors = lib.concatMap (c: c group defs) checks;
    in
    if errors == [ ] then true else builtins.trace (lib.concatStringsSep "\n" errors) false;

  # nixos/lib/systemd-unit-options.nix
  checkService = checkUnitConfig "Service" [
    (assertValueOneOf "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ])
    (assertValueOneOf "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ])
  ];
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs; in
      if lib.any (def: lib.isList def.value) defs' then lib.concatMap (def: lib.toList def.value) defs'
      else lib.mergeEqualOption loc defs';
  };
  unitNames = mkOption { type = types.listOf unitNameType; default = [ ]; };
  commonUnitOptions = {
    enable = mkOption { type = types.bool; default = true; };
    description = mkOption { type = types.singleLineStr; default = ""; };
    documentation = mkOption { type = types.listOf types.str; default = [ ]; };
    requires = unitNames;
    wants = unitNames;
    upholds = unitNames;
    after = unitNames;
    before = unitNames;
    bindsTo = unitNames;
    partOf = unitNames;
    conflicts = unitNames;
    requisite = unitNames;
    onFailure = unitNames;
    onSuccess = unitNames;
    wantedBy = unitNames;
    requiredBy = unitNames;
    upheldBy = unitNames;
    aliases = unitNames;
    unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
    overrideStrategy = mkOption {
      type = types.enum [ "asDropinIfExists" "asDropin" ];
      default = "asDropinIfExists";
    };
    # no default: a unit without them has no StartLimit*= line
    startLimitBurst = mkOption { type = types.int; };
    startLimitIntervalSec = mkOption { type = types.int; };
  };
  # nixos/lib/systemd-lib.nix (unitConfig): the [Unit] section as NixOS writes it; the
  # X-Restart-Triggers/X-Reload-Triggers store paths are left out
  unitConfigModule = { config, options, ... }: {
    config.unitConfig =
      let
        line = key: list: lib.optionalAttrs (list != [ ]) { ${key} = toString list; };
      in
      line "Requires" config.requires
      // line "Wants" config.wants
      // line "Upholds" config.upholds
      // line "After" config.after
      // line "Before" config.before
      // line "BindsTo" config.bindsTo
      // line "PartOf" config.partOf
      // line "Conflicts" config.conflicts
      // line "Requisite" config.requisite
      // lib.optionalAttrs (config.description != "") { Description = config.description; }
      // line "Documentation" config.documentation
      // line "OnFailure" config.onFailure
      // line "OnSuccess" config.onSuccess
      // lib.optionalAttrs options.startLimitIntervalSec.isDefined {
        StartLimitIntervalSec = toString config.startLimitIntervalSec;
      }
      // lib.optionalAttrs options.startLimitBurst.isDefined {
        StartLimitBurst = toString config.startLimitBurst;
      };
  };
  service = types.submodule [
    unitConfigModule
    {
      options = commonUnitOptions // {
        serviceConfig = mkOption { type = types.addCheck (types.attrsOf unitOption) checkService; default = { }; };
        environment = mkOption {
          type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
          default = { };
        };
        path = mkOption { type = types.listOf (types.oneOf [ types.package types.str ]); default = [ ]; };
        script = mkOption { type = types.lines; default = ""; };
        preStart = mkOption { type = types.lines; default = ""; };
        postStart = mkOption { type = types.lines; default = ""; };
        restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
        reloadTriggers = mkOption { type = types.listOf unitOption; default = [ ]; };
        restartIfChanged = mkOption { type = types.bool; default = true; };
        reloadIfChanged = mkOption { type = types.bool; default = false; };
        stopIfChanged = mkOption { type = types.bool; default = true; };
      };
    }
  ];
  target = types.submodule [ unitConfigModule { options = commonUnitOptions; } ];

  # nixos/modules/system/boot/systemd/tmpfiles.nix
  tmpfilesEntry = types.submodule ({ name, ... }: {
    options = {
      type = mkOption { type = types.str; default = name; };
      mode = mkOption { type = types.str; default = "-"; };
      user = mkOption { type = types.str; default = "-"; };
      group = mkOption { type = types.str; default = "-"; };
      age = mkOption { type = types.str; default = "-"; };
      argument = mkOption { type = types.str; default = ""; };
    };
  });

  # nixos/modules/config/users-groups.nix
  users = config.users;
  userOpts = { name, config, ... }: {
    options = {
      name = mkOption {
        type = types.passwdEntry types.str;
        apply = x:
          assert (builtins.stringLength x < 32 || abort "Username '${x}' is longer than 31 characters which is not allowed!");
          x;
      };
      description = mkOption { type = types.passwdEntry types.str; default = ""; };
      uid = mkOption { type = types.nullOr types.int; default = null; };
      isSystemUser = mkOption { type = types.bool; default = false; };
      isNormalUser = mkOption { type = types.bool; default = false; };
      group = mkOption {
        type = types.str;
        apply = x:
          assert (builtins.stringLength x < 32 || abort "Group name '${x}' is longer than 31 characters which is not allowed!");
          x;
        default = "";
      };
      extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
      home = mkOption { type = types.passwdEntry types.path; default = "/var/empty"; };
      createHome = mkOption { type = types.bool; default = false; };
      homeMode = mkOption { type = types.strMatching "[0-7]{1,5}"; default = "700"; };
    };
    config = lib.mkMerge [
      { name = mkDefault name; }
      (lib.mkIf config.isNormalUser {
        group = mkDefault "users";
        createHome = mkDefault true;
        home = mkDefault "/home/${config.name}"; # users.defaultUserHome
        isSystemUser = mkDefault false;
      })
    ];
  };
  groupOpts = { name, config, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; };
      gid = mkOption { type = types.nullOr types.int; default = null; };
      members = mkOption { type = types.listOf (types.passwdEntry types.str); default = [ ]; };
    };
    config = {
      name = mkDefault name;
      members = lib.mapAttrsToList (_: u: u.name) (lib.filterAttrs (_: u: lib.elem config.name u.extraGroups) users.users);
    };
  };
  groupNames = lib.mapAttrsToList (_: g: g.name) users.groups;
  usersWithoutExistingGroup = lib.filterAttrs (_: u: u.group != "" && !lib.elem u.group groupNames) users.users;
  userAssertions = name: user: [
    (
      let nameRegex = "[a-zA-Z0-9_.][a-zA-Z0-9_.-]*"; in
      {
        assertion = builtins.match nameRegex user.name != null;
        message = "The username \"${user.name}\" is not valid, it does not match the regex \"${nameRegex}\".";
      }
    )
    {
      assertion = user.isNormalUser && user.uid != null -> user.uid >= 1000;
      message = ''
        A user cannot have a users.users.${user.name}.uid set below 1000 and set users.users.${user.name}.isNormalUser.
        Either users.users.${user.name}.isSystemUser must be set to true instead of users.users.${user.name}.isNormalUser
        or users.users.${user.name}.uid must be changed to 1000 or above.
      '';
    }
    {
      assertion =
        let
          isEffectivelySystemUser = user.isSystemUser || (user.uid != null && user.uid < 1000 && !user.isNormalUser);
        in
        lib.xor isEffectivelySystemUser user.isNormalUser;
      message = ''
        Exactly one of users.users.${user.name}.isSystemUser and users.users.${user.name}.isNormalUser must be set.
      '';
    }
    {
      assertion = user.group != "";
      message = ''
        users.users.${user.name}.group is unset. This used to default to
        nogroup, but this is unsafe. For example you can create a group
        for this user with:
        users.users.${user.name}.group = "${user.name}";
        users.groups.${user.name} = {};
      '';
    }
  ];

  # nixos/modules/system/etc/etc.nix
  etcOpts = { name, config, options, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      target = mkOption { type = types.str; };
      text = mkOption { type = types.nullOr types.lines; default = null; };
      source = mkOption { type = types.path; };
      mode = mkOption { type = types.str; default = "symlink"; };
      uid = mkOption { type = types.int; default = 0; };
      gid = mkOption { type = types.int; default = 0; };
      user = mkOption { type = types.str; default = "+${toString config.uid}"; };
      group = mkOption { type = types.str; default = "+${toString config.gid}"; };
    };
    config = {
      target = mkDefault name;
      source = lib.mkIf (config.text != null) (
        let name' = "etc-" + lib.replaceStrings [ "/" ] [ "-" ] name; in
        lib.mkDerivedConfig options.text (pkgs.writeText name')
      );
    };
  };

  # nixos/modules/config/sysctl.nix
  sysctlOption = lib.mkOptionType {
    name = "sysctl option value";
    check = val:
      let checkType = x: lib.isBool x || lib.isString x || lib.isInt x || x == null; in
      checkType val || (val._type or "" == "override" && checkType val.content);
    merge = loc: defs: lib.mergeOneOption loc (lib.filterOverrides defs);
  };
  highestValueType = types.ints.unsigned // {
    merge = loc: defs: lib.foldl (a: b: if b.value == null then null else lib.max a b.value) 0 (lib.filterOverrides defs);
  };

  # nixos/modules/hardware/video/nvidia.nix
  nvidia = config.hardware.nvidia;
  nvidiaEnabled = lib.elem "nvidia" config.services.xserver.videoDrivers;
  nvidia_x11 = if nvidiaEnabled || nvidia.datacenter.enable then nvidia.package else null;

  # nixos/modules/services/cluster/rancher/default.nix (k3s: YAML manifests)
  manifestTarget = name:
    if lib.hasSuffix ".yaml" name || lib.hasSuffix ".yml" name || lib.hasSuffix ".json" name then name
    else name + ".yaml";
  manifestSource = name: manifests:
    (pkgs.formats.yaml_1_2 { }).generate name (
      if builtins.isList manifests then { apiVersion = "v1"; kind = "List"; items = manifests; } else manifests
    );
  manifestModule = types.submodule ({ name, config, options, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      target = mkOption { type = types.nonEmptyStr; };
      content = mkOption { type = types.nullOr (types.either types.attrs (types.listOf types.attrs)); default = null; };
      source = mkOption { type = types.path; };
    };
    config = {
      target = mkDefault (manifestTarget name);
      source = lib.mkIf (config.content != null) (
        lib.mkDerivedConfig options.content (manifestSource ("${name}-manifest-" + baseNameOf name))
      );
    };
  });

  portRange = types.submodule {
    options = {
      from = mkOption { type = types.port; };
      to = mkOption { type = types.port; };
    };
  };
  firewallRules = {
    allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    allowedTCPPortRanges = mkOption { type = types.listOf portRange; default = [ ]; };
    allowedUDPPortRanges = mkOption { type = types.listOf portRange; default = [ ]; };
  };
in
{
  options = {
    # nixos/modules/misc/assertions.nix
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };

    # nixos/modules/system/boot/systemd.nix
    systemd.services = mkOption { type = types.attrsOf service; default = { }; };
    systemd.targets = mkOption { type = types.attrsOf target; default = { }; };
    # nixos/modules/system/boot/systemd/tmpfiles.nix
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    systemd.tmpfiles.settings = mkOption {
      type = types.attrsOf (types.attrsOf (types.attrsOf tmpfilesEntry));
      default = { };
    };
    # nixos/modules/system/boot/networkd.nix
    systemd.network.enable = mkOption { type = types.bool; default = false; };

    # nixos/modules/config/users-groups.nix
    users.users = mkOption { type = types.attrsOf (types.submodule userOpts); default = { }; };
    users.groups = mkOption { type = types.attrsOf (types.submodule groupOpts); default = { }; };

    # nixos/modules/system/etc/etc.nix
    environment.etc = mkOption { type = types.attrsOf (types.submodule etcOpts); default = { }; };
    # nixos/modules/config/system-path.nix
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    # nixos/modules/tasks/network-interfaces.nix (default: config.system.nixos.distroId)
    networking.hostName = mkOption {
      type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
      default = "nixos";
    };
    networking.enableIPv6 = mkOption { type = types.bool; default = true; };
    networking.useNetworkd = mkOption { type = types.bool; default = false; };
    # nixos/modules/services/networking/firewall.nix
    networking.firewall = firewallRules // {
      enable = mkOption { type = types.bool; default = true; };
      interfaces = mkOption { type = types.attrsOf (types.submodule { options = firewallRules; }); default = { }; };
    };

    # nixos/modules/system/boot/kernel.nix (without its `apply`, which extends the set)
    boot.kernelPackages = mkOption { type = types.raw; default = pkgs.linuxPackages; };
    boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    # nixos/modules/config/sysctl.nix
    boot.kernel.sysctl = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf sysctlOption;
        options."net.core.rmem_max" = mkOption { type = types.nullOr highestValueType; default = null; };
        options."net.core.wmem_max" = mkOption { type = types.nullOr highestValueType; default = null; };
      };
      default = { };
    };

    # nixos/modules/services/hardware/udev.nix
    services.udev.extraRules = mkOption { type = types.lines; default = ""; };
    # nixos/modules/services/x11/xserver.nix
    services.xserver.videoDrivers = mkOption { type = types.listOf types.str; default = [ "modesetting" "fbdev" ]; };
    # nixos/modules/hardware/graphics.nix
    hardware.graphics.enable = mkOption { type = types.bool; default = false; };
    # nixos/modules/hardware/video/nvidia.nix
    hardware.nvidia = {
      enabled = mkOption { readOnly = true; type = types.bool; default = nvidia_x11 != null; };
      datacenter.enable = mkOption { type = types.bool; default = false; };
      nvidiaPersistenced = mkOption { type = types.bool; default = false; };
      package = mkOption {
        default = config.boot.kernelPackages.nvidiaPackages.${if nvidia.datacenter.enable then "dc" else "stable"};
      };
      open = mkOption {
        type = types.nullOr types.bool;
        default = if lib.versionOlder nvidia_x11.version "560" then false else null;
      };
    };

    # nixos/modules/services/cluster/rancher/default.nix (services.k3s)
    services.k3s = {
      enable = mkOption { type = types.bool; default = false; };
      role = mkOption { type = types.enum [ "server" "agent" ]; default = "server"; };
      serverAddr = mkOption { type = types.str; default = ""; };
      manifests = mkOption { type = types.attrsOf manifestModule; default = { }; };
    };
  };

  config.assertions =
    # nixos/modules/config/users-groups.nix
    [
      {
        assertion = usersWithoutExistingGroup == { };
        message =
          let
            errUsers = lib.attrNames usersWithoutExistingGroup;
            missingGroups = lib.unique (lib.mapAttrsToList (_: u: u.group) usersWithoutExistingGroup);
            mkConfigHint = group: "users.groups.${group} = {};";
          in
          ''
            The following users have a primary group that is undefined: ${lib.concatStringsSep " " errUsers}
            Hint: Add this to your NixOS configuration:
              ${lib.concatStringsSep "\n  " (map mkConfigHint missingGroups)}
          '';
      }
    ]
    ++ lib.flatten (lib.mapAttrsToList userAssertions users.users)
    # nixos/modules/hardware/video/nvidia.nix
    ++ lib.optionals nvidia.enabled [
      {
        assertion = !(nvidiaEnabled && nvidia.datacenter.enable);
        message = "You cannot configure both X11 and Data Center drivers at the same time.";
      }
      {
        assertion = nvidia.open != null;
        message = ''
          You must configure `hardware.nvidia.open` on NVIDIA driver versions >= 560.
          It is suggested to use the open source kernel modules on Turing or later GPUs (RTX series, GTX 16xx), and the closed source modules otherwise.
        '';
      }
    ];

  # nixos/modules/config/users-groups.nix: the groups NixOS always defines (their fixed gids
  # from ids.nix are left out; nothing here checks gids)
  config.users.groups = lib.genAttrs [
    "root" "wheel" "disk" "kmem" "tty" "floppy" "uucp" "lp" "cdrom" "tape" "audio" "video"
    "dialout" "nogroup" "users" "nixbld" "utmp" "adm" "input" "kvm" "render" "sgx" "shadow" "clock"
  ] (_: { });
}
