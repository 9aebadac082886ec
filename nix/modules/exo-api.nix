# services.exo.gateway: exo-api.service, the authenticated front door to the cluster.
# The gateway itself is `exo-nixos gateway` (src/exo_nixos/gateway); docs/gateway.md.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkIf types optional;
  cfg = config.services.exo;
  gw = cfg.gateway;
  exoTypes = import ./lib/types.nix { inherit lib; };
  inherit (exoTypes) absolutePath;
  exe = lib.getExe' cfg.toolPackage "exo-nixos";
  loopback = import ./lib/loopback.nix gw.listenAddress;
  tls = gw.tlsCertificateFile != null && gw.tlsKeyFile != null;
  inStore = path: path != null && lib.hasPrefix builtins.storeDir path;
  netns = cfg.networking.networkNamespace;
  networkService = import ./lib/network-service.nix;
  json = pkgs.formats.json { };
in
{
  imports = [ ./exo-service.nix ];

  # Types say what kind of value; the bounds (body size, timeouts, connections) are the config
  # model's, checked when config.json is built.
  options.services.exo.gateway = {
    enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run `exo-api.service`, the authenticated gateway to the cluster's EXO APIs.";
    };
    listenAddress = mkOption {
      # an IPv4 or IPv6 address, as the gateway binds it (host names are not resolved)
      type = exoTypes.ipAddress;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address the gateway listens on; anything but loopback needs `apiKeysFile`.";
    };
    port = mkOption {
      type = types.port;
      default = 52417;
      description = "TCP port the gateway listens on (clients use this, not EXO's `apiPort`).";
    };
    apiKeysFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/run/secrets/exo-api-keys";
      description = ''
        File of API keys, one per line (`name:key` names a key; `#` starts a comment; keys
        are at least 16 characters). Never put it in the Nix store. The gateway reads it
        itself, so it must be readable by the service's group (`security.group`), e.g.
        owner `root`, group `exo`, mode `0440`; a file other users may read or write is refused.
        `systemctl reload exo-api` re-reads it; a file that fails to parse keeps the keys
        already loaded.
      '';
    };
    tlsCertificateFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/var/lib/acme/exo.example.org/fullchain.pem";
      description = "PEM certificate (chain) to serve HTTPS with; passed with `LoadCredential=`.";
    };
    tlsKeyFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/var/lib/acme/exo.example.org/key.pem";
      description = "PEM private key of `tlsCertificateFile`; passed with `LoadCredential=`.";
    };
    publicPaths = mkOption {
      type = types.listOf exoTypes.publicPath;
      default = [ "/health" ];
      example = [ "/health" "/metrics" ];
      description = "Exact request paths served without an API key.";
    };
    staticBackends = mkOption {
      type = types.listOf exoTypes.url;
      default = [ ];
      example = [ "http://10.0.0.12:52415" ];
      description = "EXO node APIs to use besides the local node and the peers in its cluster state.";
    };
    localBackend = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Use this host's node API (`http://127.0.0.1:''${apiPort}`) as a backend and learn the
        cluster's other nodes from its `/state`.
      '';
    };
    maxBodyBytes = mkOption {
      type = types.ints.positive;
      default = 67108864;
      description = "Largest request body accepted (the gateway buffers it, so at most 1 GiB); larger requests are answered with 413.";
    };
    connectTimeoutSec = mkOption {
      type = types.numbers.positive;
      default = 5;
      description = "Seconds to connect to a backend before the request is tried on another.";
    };
    responseTimeoutSec = mkOption {
      type = types.numbers.positive;
      default = 900;
      description = ''
        Seconds a backend may take to start answering (a non-streamed generation answers only
        when done) before the request is tried on another.
      '';
    };
    headerReadTimeoutSec = mkOption {
      type = types.numbers.positive;
      default = 10;
      description = ''
        Seconds a new client connection may take to send its first request's headers (and,
        with TLS, to finish the handshake) before the gateway closes it.
      '';
    };
    keepAliveTimeoutSec = mkOption {
      type = types.numbers.positive;
      default = 30;
      description = ''
        Seconds a client connection may stay idle after a response, or keep a request's
        headers incomplete, before the gateway closes it.
      '';
    };
    streamIdleTimeoutSec = mkOption {
      type = types.numbers.positive;
      default = 300;
      description = ''
        Seconds a response being passed on may go without data from the backend, or without
        the client taking any, before the gateway closes both connections (the client sees
        an incomplete response).
      '';
    };
    maxConnectionsPerAddress = mkOption {
      type = types.ints.positive;
      default = 256;
      description = ''
        Client connections open at once from one IP address; further ones are closed at once
        (logged once per address while it is at the limit).
      '';
    };
    workers = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 4;
      description = ''
        Gateway processes sharing the port (`SO_REUSEPORT`), each serving on one core; key
        limits, backend health and metrics hold across them. `null`: one per CPU core the
        service may use, at most 8.
      '';
    };
    keyPolicies = mkOption {
      # free-form here: the rules (names, limits, fields) are the config model's
      # (KeyPolicy in src/exo_nixos/config.py), checked when the gateway starts or reloads
      type = types.attrsOf json.type;
      default = { };
      example = lib.literalExpression ''
        {
          alice = { requestsPerMinute = 60; concurrency = 4; tokensPerMinute = 200000; };
          ci-runner = { models = [ "mlx-community/Llama-3.2-1B-Instruct-4bit" ]; };
          "*" = { requestsPerMinute = 20; };
        }
      '';
      description = ''
        Limits by API key name (the names in `apiKeysFile`); `"*"` applies to every key
        without an entry of its own. Each entry may set `requestsPerMinute`, `concurrency`
        (requests in flight), `tokensPerMinute` (prompt plus completion tokens, from EXO's
        `usage`) and `models` (the models the key may name; others get 403). A request over
        a limit gets 429 with `Retry-After`. Needs `apiKeysFile`.
      '';
    };
    policyFile = mkOption {
      type = types.nullOr absolutePath;
      default = null;
      example = "/run/secrets/exo-api-policy.json";
      description = ''
        JSON file of key policies shaped like `keyPolicies` (whose entries it replaces by
        name), kept next to `apiKeysFile` and re-read with it by `systemctl reload exo-api`;
        a file that does not parse keeps the policies already loaded. Readable by the
        service's group.
      '';
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the gateway port to clients on every interface. EXO's own API port is not opened
        here: it stays for the cluster peers (see `services.exo.networking.openFirewall`).
      '';
    };
  };

  config = mkIf cfg.enable {
    # every option is a key of the contract but the firewall's (the config check refuses a
    # key the model does not know, so an option cannot be forgotten on either side)
    services.exo.configDocument.gateway = removeAttrs gw [ "openFirewall" ];

    # The rest of the gateway's rules (keys when exposed, TLS pairs, port clashes, backends)
    # are the config model's, checked when config.json is built (exo-service.nix).
    assertions = mkIf gw.enable [
      {
        assertion = !(inStore gw.apiKeysFile || inStore gw.tlsKeyFile);
        message = "services.exo.gateway.apiKeysFile and tlsKeyFile must not be in the Nix store (it is world-readable); point them at a secret outside it, e.g. under /run/secrets.";
      }
    ];

    warnings = optional (gw.enable && gw.openFirewall && loopback)
      "services.exo.gateway.openFirewall is set but the gateway listens on ${gw.listenAddress} only; set listenAddress (e.g. \"0.0.0.0\") for clients to reach it.";

    networking.firewall.allowedTCPPorts = optional (gw.enable && gw.openFirewall) gw.port;

    systemd.targets.exo.wants = optional gw.enable "exo-api.service";

    systemd.services.exo-api = mkIf gw.enable {
      description = "EXO API gateway (authenticated, health-aware)";
      after = [ "network.target" ] ++ cfg.nodeServices;
      # one node: it goes, the gateway goes; one node per GPU: each may come and go alone
      requires = lib.optionals (lib.length cfg.nodeServices == 1) cfg.nodeServices;
      wants = cfg.nodeServices;
      partOf = [ "exo.target" ];
      wantedBy = [ "exo.target" ];
      serviceConfig = networkService // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${exe} gateway --config ${cfg.configFile}";
        # A key or policy file that does not parse fails the reload visibly (the running
        # gateway would keep what it has anyway); good ones are re-read on SIGHUP.
        ExecReload = [
          "${exe} gateway --check --config ${cfg.configFile}"
          "${pkgs.coreutils}/bin/kill -HUP $MAINPID"
        ];
        Restart = "on-failure";
        RestartSec = 2;
        User = cfg.security.user;
        Group = cfg.security.group;
        # Read by the gateway from $CREDENTIALS_DIRECTORY (the files may be root-only).
        LoadCredential = mkIf tls [
          "tls-certificate:${gw.tlsCertificateFile}"
          "tls-key:${gw.tlsKeyFile}"
        ];
        LimitNOFILE = 65535;
        # EXO in a network namespace answers on that namespace's loopback and interfaces only:
        # the gateway joins it (clients reach it on the interfaces moved there).
        NetworkNamespacePath = mkIf (netns != null) "/run/netns/${netns}";
      };
    };
  };
}
