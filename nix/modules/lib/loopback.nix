# Whether an address the gateway listens on is loopback only (127.0.0.0/8 or ::1): such a
# gateway needs no API keys and is out of reach of other hosts and of pods.
address: builtins.match "127\\..*|::1" address != null
