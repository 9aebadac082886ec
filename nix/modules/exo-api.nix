# services.exo.gateway: exo-api.service, the authenticated front door to the cluster.
{ config, lib, ... }:
let
  inherit (lib) mkOption mkIf types;
  cfg = config.services.exo;
  gw = cfg.gateway;
  absolutePath = types.strMatching "/.*";
in
{
  imports = [ ./exo-service.nix ];

  options.services.exo.gateway = {
    enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run `exo-api.service`, the authenticated gateway to the cluster's EXO APIs.";
    };
    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address the gateway listens on; anything but loopback needs `apiKeysFile`.";
    };
    port = mkOption { type = types.port; default = 52417; description = "Gateway port."; };
    apiKeysFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/run/secrets/exo-api-keys";
      description = "File of API keys, one per line; reloaded on `systemctl reload exo-api`.";
    };
    tlsCertificateFile = mkOption { type = types.nullOr absolutePath; default = null; description = "TLS certificate (PEM)."; };
    tlsKeyFile = mkOption { type = types.nullOr absolutePath; default = null; description = "TLS private key (PEM)."; };
    publicPaths = mkOption {
      type = types.listOf types.str;
      default = [ "/health" ];
      example = [ "/health" "/metrics" ];
      description = "Paths served without an API key.";
    };
    staticBackends = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "http://10.0.0.12:52415" ];
      description = "EXO node APIs to use besides those found in the cluster state.";
    };
    maxBodyBytes = mkOption { type = types.ints.positive; default = 67108864; description = "Largest request body accepted."; };
    openFirewall = mkOption { type = types.bool; default = false; description = "Open the gateway port to clients."; };
  };

  config = mkIf cfg.enable {
    services.exo.configDocument.gateway = {
      inherit (gw)
        enable listenAddress port apiKeysFile tlsCertificateFile tlsKeyFile publicPaths
        staticBackends maxBodyBytes;
    };
  };
}
