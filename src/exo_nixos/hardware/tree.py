"""The host-tree reader detection uses: :mod:`exo_nixos.hosttree` (kept importable here)."""

from exo_nixos.hosttree import Tree, key_values

__all__ = ["Tree", "key_values"]
