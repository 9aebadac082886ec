"""The cluster seen from one host: ``exo-nixos status``, the Prometheus exporter, memory
pressure of the node unit (PSI)."""
