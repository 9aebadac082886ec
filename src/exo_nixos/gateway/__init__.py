"""The API gateway in front of the cluster's EXO node APIs (``exo-nixos gateway``).

``auth`` checks API keys, ``policy`` applies per-key limits and reads EXO's usage,
``backends`` keeps the health-checked set of node APIs, ``connections`` limits client
connections, ``proxy`` serves and forwards requests, ``metrics`` holds the Prometheus
metrics, ``shared`` the state worker processes share, ``server`` runs one process and
``workers`` several on one port.
"""
