"""Run LinkWatcher with a callback and print each event as JSON (for netns tests).

Usage: python -m tests.network_watch_probe NAME... ; stops after SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from exo_nixos.network import LinkEvent, LinkWatcher


async def main(names: list[str]) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def report(event: LinkEvent) -> None:
        print(
            json.dumps(
                {
                    "name": event.name,
                    "up": event.up,
                    "present": event.current.present,
                    "initial": event.previous is None,
                    "states": {n: s.up for n, s in watcher.states.items()},
                }
            ),
            flush=True,
        )

    watcher = LinkWatcher(names, callback=report)
    async with watcher:
        print(json.dumps({"started": True}), flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
