"""The API gateway in front of the cluster's EXO node APIs (``exo-nixos gateway``).

``auth`` checks API keys, ``backends`` keeps the health-checked set of node APIs,
``connections`` limits client connections, ``proxy`` serves and forwards requests, ``metrics``
holds the Prometheus metrics.
"""
