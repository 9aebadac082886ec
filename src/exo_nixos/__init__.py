"""exo-nixos: run EXO distributed AI inference on NixOS machines."""

__version__ = "0.1.0"
