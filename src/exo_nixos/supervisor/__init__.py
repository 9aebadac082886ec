"""The supervisor behind ``exo-nixos run``: EXO as a ``Type=notify`` systemd service.

- :mod:`.notify`: the sd_notify protocol (READY, WATCHDOG, STATUS, STOPPING).
- :mod:`.environment`: the EXO command line and environment built from the config.
- :mod:`.snapshot`: crash-safe topology snapshots in the state directory.
- :mod:`.runner`: runs EXO as a child, probes its API, forwards signals.
- :mod:`.oom`: the run record and the smaller memory offer after an OOM kill.
"""
