"""Declared models: the cache's integrity, upstream's model routes, the reconciler."""
