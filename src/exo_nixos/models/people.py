"""``exo-nixos models list | pull | place | remove``: the cluster's models, for people.

They talk to one node's API, or to the gateway with ``--api-key-file``, and follow
downloads in ``/state`` (per node, ``DownloadOngoing`` with bytes done and total): a
progress bar per node on a terminal (rich), a plain line every few seconds otherwise.
Exit codes: 0 done, 1 the cluster could not do it (refused, failed, not in time), 2 usage
error or the node not answering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from exo_nixos.addresses import local_api_url
from exo_nixos.basetypes import DEFAULT_CONFIG_PATH, EXO_API_PORT
from exo_nixos.errors import UserError
from exo_nixos.exoapi import ExoApiError, State, short_id
from exo_nixos.gateway.auth import read_client_key
from exo_nixos.models.api import ModelsApi, Placement
from exo_nixos.models.reconcile import (
    download_status,
    downloads_of,
    instance_ready,
    instances_of,
)

if TYPE_CHECKING:
    from exo_nixos.config import Config

POLL_S = 0.5
PLAIN_EVERY_S = 2.0


def _config(path: str | None) -> Config | None:
    from exo_nixos.config import load_config

    if path is not None:
        return load_config(path)
    return load_config(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else None


def _url(args: argparse.Namespace, config: Config | None) -> str:
    if args.url:
        return str(args.url)
    port = config.api_port if config is not None else EXO_API_PORT
    return local_api_url(port)


def main(args: argparse.Namespace) -> int:
    import aiohttp

    config = _config(args.config)
    url = _url(args, config)
    key = read_client_key(str(args.api_key_file)) if args.api_key_file else None

    async def run() -> int:
        async with aiohttp.ClientSession() as session:
            api = ModelsApi(session, url, timeout_s=args.timeout, api_key=key)
            return await _dispatch(args, api, config)

    from exo_nixos.exoapi import run_coroutine

    return run_coroutine(run())


async def _dispatch(args: argparse.Namespace, api: ModelsApi, config: Config | None) -> int:
    if args.action == "list":
        return await list_models(api, config, as_json=args.json, out=sys.stdout)
    if args.action == "remove":
        return await remove(api, config, args.model, out=sys.stdout)
    placement = _placement(args)
    view = progress_view(sys.stdout, plain=args.no_progress)
    try:
        if args.action == "pull":
            return await pull(api, placement, wait_s=args.wait, view=view)
        return await place(api, placement, wait_s=args.wait, view=view)
    finally:
        view.close()


def _placement(args: argparse.Namespace) -> Placement:
    """The command line's placement, judged by the config model's rules for ``models``."""
    from exo_nixos.config import DeclaredModel
    from exo_nixos.errors import ConfigError

    entry = {
        "sharding": getattr(args, "sharding", "Pipeline"),
        "instanceMeta": getattr(args, "instance_meta", "MlxRing"),
        "minNodes": getattr(args, "min_nodes", 1),
    }
    try:
        from exo_nixos.config import parse_config

        spec: DeclaredModel = parse_config(
            {"schemaVersion": 1, "models": {args.model: entry}}
        ).models[args.model]
    except ConfigError as exc:
        problem = (exc.problems or [str(exc)])[0]
        raise UserError(problem.replace("(document): ", "")) from None
    return Placement.declared(args.model, spec)


# -- list ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    model_id: str
    declared: str
    """``running``, ``downloaded`` (declared, kept downloaded only), ``-`` not declared,
    ``?`` when no config was read."""
    instances: int
    ready: bool
    nodes: dict[str, str]
    """Node -> ``downloaded``, ``downloading 43%``, ``download failed``; plus ``runner X``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "modelId": self.model_id,
            "declared": self.declared,
            "instances": self.instances,
            "ready": self.ready,
            "nodes": self.nodes,
        }


def rows(state: State, config: Config | None) -> list[ModelRow]:
    declared = config.models if config is not None else {}
    models = list(declared)
    models += [i.model_id for i in state.instances.values()]
    models += [e.model_id for entries in state.downloads.values() for e in entries]
    result: list[ModelRow] = []
    for model_id in dict.fromkeys(m for m in models if m):
        spec = declared.get(model_id)
        if config is None:
            label = "?"
        elif spec is None:
            label = "-"
        else:
            label = "running" if spec.running else "downloaded"
        nodes: dict[str, str] = {}
        for node, entry in downloads_of(state, model_id):
            if entry.status == "Completed":
                nodes[node] = "downloaded"
            elif entry.status == "Failed":
                nodes[node] = f"download failed: {entry.error_message or 'no reason given'}"
            else:
                nodes[node] = f"downloading {entry.fraction:.0%}"
        instances = instances_of(state, model_id)
        for instance in instances:
            for node in instance.node_ids:
                runner = state.runner_of(node, instance)
                name = runner.name if runner is not None else "none"
                nodes[node] = ", ".join(filter(None, [nodes.get(node), f"runner {name}"]))
        ready = any(instance_ready(state, i) for i in instances)
        result.append(ModelRow(model_id, label, len(instances), ready, nodes))
    return result


def render_rows(found: list[ModelRow]) -> str:
    if not found:
        return "no models declared, downloaded or running\n"
    width = max(len(r.model_id) for r in found)
    lines = [f"{'MODEL':<{width}}  {'DECLARED':<10}  {'INSTANCES':<9}  STATE"]
    for row in found:
        if row.ready:
            state = "running"
        elif row.instances:
            state = "starting"
        elif row.nodes and all(v == "downloaded" for v in row.nodes.values()):
            state = "downloaded"
        elif row.nodes:
            state = "downloading"
        else:
            state = "absent"
        lines.append(f"{row.model_id:<{width}}  {row.declared:<10}  {row.instances:<9}  {state}")
        lines += [f"  {short_id(node)}  {text}" for node, text in row.nodes.items()]
    return "\n".join(lines) + "\n"


async def list_models(api: ModelsApi, config: Config | None, *, as_json: bool, out: TextIO) -> int:
    state = await api.state()
    found = rows(state, config)
    if as_json:
        json.dump({"models": [r.to_json() for r in found]}, out, indent=2)
        out.write("\n")
    else:
        out.write(render_rows(found))
    return 0


# -- progress ------------------------------------------------------------------------------


class ProgressView:
    """Download progress per node: ``update`` as ``/state`` is polled, ``note`` for events."""

    def update(self, node: str, done: int, total: int, status: str) -> None:
        raise NotImplementedError

    def note(self, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to close by default."""


class PlainProgress(ProgressView):
    """Plain lines (not a terminal): a node's line when its status changes, else every
    few seconds."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._last: dict[str, tuple[str, float]] = {}

    def update(self, node: str, done: int, total: int, status: str) -> None:
        now = time.monotonic()
        previous = self._last.get(node)
        if previous is not None and previous[0] == status and now - previous[1] < PLAIN_EVERY_S:
            return
        self._last[node] = (status, now)
        share = f"{done / total:.0%} " if total else ""
        self.out.write(
            f"{short_id(node)}: {status.lower()} {share}({_mib(done)} of {_mib(total)})\n"
        )
        self.out.flush()

    def note(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


class RichProgress(ProgressView):
    """One bar per node (rich), on a terminal."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(file=out)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self._tasks: dict[str, Any] = {}

    def update(self, node: str, done: int, total: int, status: str) -> None:
        task = self._tasks.get(node)
        label = f"{short_id(node)} {status.lower()}"
        if task is None:
            task = self._tasks[node] = self.progress.add_task(label, total=total or None)
        self.progress.update(task, completed=done, total=total or None, description=label)

    def note(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def progress_view(out: TextIO, *, plain: bool = False) -> ProgressView:
    if plain or not out.isatty():
        return PlainProgress(out)
    return RichProgress(out)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _show_downloads(state: State, model_id: str, view: ProgressView) -> None:
    for node, entry in downloads_of(state, model_id):
        view.update(node, entry.downloaded_bytes, entry.total_bytes, entry.status)


def _failed_download(state: State, model_id: str) -> str | None:
    for node, entry in downloads_of(state, model_id):
        if entry.status == "Failed":
            return f"download failed on {short_id(node)}: {entry.error_message or '?'}"
    return None


# -- pull, place, remove -------------------------------------------------------------------


async def _preview_or_reason(api: ModelsApi, placement: Placement, out: ProgressView) -> Any:
    """The placement preview; ``None`` (with the reason shown) when the cluster refuses."""
    try:
        return await api.preview(placement)
    except ExoApiError as exc:
        if exc.status == 400:
            out.note(f"the cluster cannot place {placement.model_id}: {_after_colon(exc)}")
            return None
        if exc.status == 500:
            raise UserError(
                f"EXO has no model card for {placement.model_id!r} (HTTP 500): check the id; "
                "a model outside EXO's catalogue needs Hugging Face (declare it custom)"
            ) from None
        raise


def _after_colon(exc: ExoApiError) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


async def pull(api: ModelsApi, placement: Placement, *, wait_s: float, view: ProgressView) -> int:
    """Download the model on the nodes a placement would use (``/download/start`` each)."""
    preview = await _preview_or_reason(api, placement, view)
    if preview is None:
        return 1
    nodes = preview.shards_by_node()
    for node, shard in nodes.items():
        await api.start_download(node, shard)
    view.note(f"downloading {placement.model_id} on {len(nodes)} node(s)")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = await api.state()
        _show_downloads(state, placement.model_id, view)
        if failure := _failed_download(state, placement.model_id):
            view.note(failure)
            return 1
        statuses = download_status(state, placement.model_id)
        if all(statuses.get(n) == "Completed" for n in nodes):
            view.note(f"{placement.model_id} downloaded on {len(nodes)} node(s)")
            return 0
        await asyncio.sleep(POLL_S)
    view.note(f"{placement.model_id}: not downloaded after {wait_s:g}s")
    return 1


async def place(api: ModelsApi, placement: Placement, *, wait_s: float, view: ProgressView) -> int:
    """Place an instance (unless one exists) and follow it until its runners are ready."""
    model_id = placement.model_id
    state = await api.state()
    if not instances_of(state, model_id):
        if await _preview_or_reason(api, placement, view) is None:
            return 1
        await api.place(placement)
        view.note(f"placing {model_id}")
        if not await api.await_instance(model_id, min(wait_s, 60.0)):
            view.note(f"{model_id}: EXO created no instance (see the master's EXO log)")
            return 1
    else:
        view.note(f"{model_id} has an instance already; following it")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = await api.state()
        _show_downloads(state, model_id, view)
        if failure := _failed_download(state, model_id):
            view.note(failure)
            return 1
        instances = instances_of(state, model_id)
        if not instances:
            view.note(f"{model_id}: the instance was torn down")
            return 1
        if any(instance_ready(state, i) for i in instances):
            view.note(f"{model_id} is running ({short_id(instances[0].instance_id)})")
            return 0
        failed = [
            r.error_message or "runner failed"
            for i in instances
            for n in i.node_ids
            if (r := state.runner_of(n, i)) is not None and r.name == "Failed"
        ]
        if failed:
            view.note(f"{model_id}: {failed[0]}")
            return 1
        await asyncio.sleep(POLL_S)
    view.note(f"{model_id}: not ready after {wait_s:g}s")
    return 1


async def remove(api: ModelsApi, config: Config | None, model_id: str, *, out: TextIO) -> int:
    """Delete every instance of ``model_id``; its downloaded files stay."""
    state = await api.state()
    instances = instances_of(state, model_id)
    for instance in instances:
        await api.delete_instance(instance.instance_id)
        out.write(f"deleted instance {instance.instance_id} of {model_id}\n")
    if not instances:
        out.write(f"no instance of {model_id}\n")
    declared: Mapping[str, Any] = config.models if config is not None else {}
    spec = declared.get(model_id)
    if spec is not None and spec.running:
        out.write(
            f"note: {model_id} is declared running; the reconciler places it again. "
            "Remove it from services.exo.models to keep it stopped.\n"
        )
    return 0
