# services.exo.hardware: which accelerator EXO uses and the device access its unit gets.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf types literalExpression;
  cfg = config.services.exo;
  hw = cfg.hardware;
  accelerators = [ "cuda" "rocm" "mlx" "cpu" ];
in
{
  imports = [ ./exo-service.nix ];

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
      type = types.nullOr (types.enum accelerators);
      default = null;
      example = "cuda";
      description = ''
        Use this accelerator when it works on the host. Upstream EXO has CUDA, MLX (Apple)
        and CPU backends only: `rocm` is accepted but EXO then runs on the CPU, and says so.
      '';
    };

    memoryLimit = mkOption {
      type = types.nullOr (types.strMatching "[0-9]+(\\.[0-9]+)?( *%|[KMGTkmgt]?(i?B)?)");
      default = null;
      example = "80%";
      description = ''
        Memory EXO may use: a share of physical memory (`"80%"`) or a size (`"48G"`). Sets the
        unit's `MemoryMax` and the memory EXO plans with (`OVERRIDE_MEMORY_MB`).
      '';
    };

    packages = mkOption {
      type = types.attrsOf types.package;
      default = { cpu = cfg.package; };
      defaultText = literalExpression "{ cpu = config.services.exo.package; }";
      example = literalExpression "{ cpu = pkgs.exo-complete; cuda = pkgs.exo-cuda; }";
      description = "Installed EXO variants by accelerator; the supervisor runs the chosen one.";
    };

    visibleDevices = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "0" "1" ];
      description = "GPU indices or UUIDs EXO may use (`CUDA_VISIBLE_DEVICES`); `null`: all.";
    };

    rocmGfxOverride = mkOption {
      type = types.nullOr (types.strMatching "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}");
      default = null;
      example = "10.3.0";
      description = "`HSA_OVERRIDE_GFX_VERSION` for AMD cards ROCm does not recognise as-is.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.all (name: lib.elem name accelerators) (lib.attrNames hw.packages);
        message = "services.exo.hardware.packages: keys must be among ${lib.concatStringsSep ", " accelerators}.";
      }
    ];

    services.exo.configDocument.hardware = {
      inherit (hw) autoDetect preferredAccelerator memoryLimit visibleDevices rocmGfxOverride;
      packages = lib.mapAttrs (_: toString) hw.packages;
    };
  };
}
