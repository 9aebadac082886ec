"""Run LinkWatcher with a callback and print each event as JSON (for netns tests).

Usage: python -m tests.network_watch_probe [--fail-first] [--close-socket] NAME...
Stops after SIGTERM. With --fail-first the callback raises on its first call; with
--close-socket the watcher's netlink socket is closed under it after the start. In both
cases the watcher must carry on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from exo_nixos.network import LinkEvent, LinkWatcher


async def main(names: list[str], fail_first: bool, close_socket: bool) -> None:
    stop = asyncio.Event()
    calls = 0
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def report(event: LinkEvent) -> None:
        nonlocal calls
        calls += 1
        if fail_first and calls == 1:
            raise RuntimeError("the consumer failed")
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
        if close_socket:
            watcher._socket.close()  # what a failed socket (e.g. ENOBUFS) looks like
            print(json.dumps({"closed": True}), flush=True)
        await stop.wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    flags = {"--fail-first", "--close-socket"}
    names = [a for a in args if a not in flags]
    asyncio.run(main(names, "--fail-first" in args, "--close-socket" in args))
