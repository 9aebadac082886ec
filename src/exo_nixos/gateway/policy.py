"""Per-key policy: allowed models, requests and tokens per minute, requests in flight.

Policies come from ``gateway.keyPolicies`` in the config and from ``gateway.policyFile``
(a JSON object of the same shape, reloaded on SIGHUP; its entries replace the config's by
name). ``"*"`` is the policy of every key without an entry of its own. Both are judged by
the config model (``exo_nixos.config.KeyPolicy``), so a rule is written once.

The limits are kept in a ``SharedTable``, so they hold across the gateway's worker
processes:

- requests per minute: GCRA (a token bucket of ``rpm`` requests refilled over a minute);
- tokens per minute: a bucket of ``tpm`` tokens refilled over a minute; a request is let
  through while the bucket is not empty and its usage (EXO's ``usage``) is taken from it when
  the response ends, so a large answer may leave the bucket in debt for a while;
- concurrency: the requests of the key in flight in every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_nixos.config import EVERY_KEY, KeyPolicies, KeyPolicy
from exo_nixos.errors import UserError
from exo_nixos.fsutil import os_reason, read_bounded
from exo_nixos.gateway.shared import SharedTable, TableFull

log = logging.getLogger(__name__)

MAX_POLICY_FILE_BYTES = 1 << 20

# the fields of a key's row in the shared table
_RPM_TAT, _TPM_LEVEL, _TPM_STAMP = range(3)
KEY_FIELDS = 3
# rows of the key table: the key file's names are far fewer (a file holds at most 1 MiB)
KEY_ROWS = 4096


def key_table(workers: int = 1) -> SharedTable:
    """The table of the key limits' state shared by ``workers`` processes (see Limiter)."""
    return SharedTable(KEY_ROWS, KEY_FIELDS, workers)


def read_policy_file(path: Path) -> KeyPolicies:
    """Read and judge a policy file; every failure is a one-line UserError. Blocking."""
    from pydantic import TypeAdapter, ValidationError

    from exo_nixos import jsonio

    try:
        # a regular file only: a FIFO would hold the reload (and its thread) for ever
        data = read_bounded(path, MAX_POLICY_FILE_BYTES)
    except FileNotFoundError:
        raise UserError(f"{path}: key policy file not found; create it or fix policyFile") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the key policy file: {os_reason(exc)}") from None
    try:
        document = jsonio.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON document: {exc}") from None
    try:
        policies: KeyPolicies = TypeAdapter(KeyPolicies).validate_python(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise UserError(
            f"{path}: {where}: {message} ({exc.error_count()} problem(s); "
            "the file is shaped like services.exo.gateway.keyPolicies)"
        ) from None
    return policies


class PolicyStore:
    """The key policies in force: the config's, with the policy file's entries over them."""

    def __init__(self, base: KeyPolicies, path: Path | None) -> None:
        self.base = dict(base)
        self.path = path
        self.policies: dict[str, KeyPolicy] = dict(base)
        if path is not None:
            self.policies = {**self.base, **read_policy_file(path)}

    def __len__(self) -> int:
        return len(self.policies)

    def of(self, key: str) -> KeyPolicy | None:
        return self.policies.get(key) or self.policies.get(EVERY_KEY)

    async def reload(self) -> bool:
        """Re-read the policy file in a worker thread; on a problem keep the policies."""
        if self.path is None:
            return True
        try:
            loaded = await asyncio.to_thread(read_policy_file, self.path)
        except UserError as exc:
            log.error(
                "key policies not reloaded, keeping the %d loaded: %s", len(self.policies), exc
            )
            return False
        self.policies = {**self.base, **loaded}
        log.info("key policies reloaded from %s: %d entries", self.path, len(self.policies))
        return True


@dataclass(frozen=True)
class Refusal:
    """Why a request is not let through: the HTTP status, the limit, the client's message."""

    status: int
    limit: str  # "model", "concurrency", "requests_per_minute", "tokens_per_minute"
    message: str
    retry_after: int | None = None  # seconds, for a 429


class Limiter:
    """Admits requests by their key's policy; the state is in a table shared by workers."""

    def __init__(self, store: PolicyStore, table: SharedTable) -> None:
        self.store = store
        self.table = table

    def admit(self, key: str, model: str | None) -> Refusal | int | None:
        """A Refusal, or the row to give back to ``done`` (None: no policy applies)."""
        policy = self.store.of(key)
        if policy is None:
            return None
        if policy.models is not None and model is not None and model not in policy.models:
            return Refusal(403, "model", f"the API key '{key}' may not use the model {model!r}")
        try:
            row = self.table.row(key)
        except TableFull:
            log.error("key policy table full: key %s is not limited", key)
            return None
        refusal = self._take(row, key, policy, time.monotonic())
        return refusal if refusal is not None else row

    def _take(self, row: int, key: str, policy: KeyPolicy, now: float) -> Refusal | None:
        table = self.table
        refusal: Refusal | None = None

        def change(fields: list[float]) -> None:
            nonlocal refusal
            if policy.concurrency is not None and table.total(row) >= policy.concurrency:
                refusal = _too_many(key, "concurrency", policy.concurrency, 1.0)
                return
            tpm = policy.tokens_per_minute
            if tpm is not None:
                level = _refilled(fields, tpm, now)
                if level <= 0:
                    wait = -level / (tpm / 60.0) + 0.001
                    refusal = _too_many(key, "tokens_per_minute", tpm, wait)
                    return
            rpm = policy.requests_per_minute
            if rpm is not None:
                interval = 60.0 / rpm
                tolerance = 60.0 - interval  # a burst of up to rpm requests
                tat = max(fields[_RPM_TAT], now)
                if tat - now > tolerance:
                    refusal = _too_many(key, "requests_per_minute", rpm, tat - tolerance - now)
                    return
                fields[_RPM_TAT] = tat + interval
            table.add_own(row, 1)

        table.update(row, change)
        return refusal

    def done(self, row: int, key: str, tokens: int) -> None:
        """A request admitted with ``row`` ended, having used ``tokens``."""
        self.table.add_own(row, -1)
        policy = self.store.of(key)
        if not tokens or policy is None or policy.tokens_per_minute is None:
            return
        tpm = policy.tokens_per_minute
        now = time.monotonic()

        def change(fields: list[float]) -> None:
            fields[_TPM_LEVEL] = _refilled(fields, tpm, now) - tokens

        self.table.update(row, change)


def _refilled(fields: list[float], tpm: int, now: float) -> float:
    """The token bucket's level at ``now`` (full when first used), stamped in ``fields``."""
    stamp = fields[_TPM_STAMP]
    level = tpm if stamp == 0 else fields[_TPM_LEVEL] + (now - stamp) * tpm / 60.0
    level = min(float(tpm), level)
    fields[_TPM_LEVEL] = level
    fields[_TPM_STAMP] = now
    return level


def _too_many(key: str, limit: str, value: int, wait: float) -> Refusal:
    words = limit.replace("_", " ")
    return Refusal(
        429,
        limit,
        f"the API key '{key}' is over its limit of {value} {words}; retry later",
        max(1, math.ceil(wait)),
    )


# --- usage as EXO reports it --------------------------------------------------------------


@dataclass
class Usage:
    """Tokens of one request, as far as the response told them."""

    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def take(self, document: Any) -> None:
        """Read the usage of one JSON document (a whole answer, or one event of a stream).

        OpenAI chat completions (``usage.prompt_tokens``/``completion_tokens``; streamed, on
        the last chunk only), Claude messages and OpenAI responses (``input_tokens``/
        ``output_tokens``, in ``message.usage``, ``usage`` or ``response.usage``), Ollama
        (``prompt_eval_count``/``eval_count``): upstream's adapters in src/exo/api/adapters/.
        The largest value seen wins (Claude's stream gives the input and output in different
        events, and the output count grows).
        """
        if not isinstance(document, dict):
            return
        usage = document.get("usage")
        for outer in ("message", "response"):
            inner = document.get(outer)
            if usage is None and isinstance(inner, dict):
                usage = inner.get("usage")
        if isinstance(usage, dict):
            self._see(
                usage, ("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens")
            )
        elif "eval_count" in document or "prompt_eval_count" in document:
            self._see(document, ("prompt_eval_count",), ("eval_count",))

    def _see(
        self, source: dict[str, Any], prompt: tuple[str, ...], completion: tuple[str, ...]
    ) -> None:
        self.prompt = _largest(source, prompt, self.prompt)
        self.completion = _largest(source, completion, self.completion)

    def take_body(self, body: bytes) -> None:
        """A whole JSON answer."""
        if _names_usage(body):
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                self.take(json.loads(body))


def _largest(source: dict[str, Any], names: tuple[str, ...], seen: int) -> int:
    """The largest of ``seen`` and the integers ``source`` has under ``names``."""
    for name in names:
        value = source.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            seen = max(seen, value)
    return seen


def _names_usage(data: bytes) -> bool:
    """Whether ``data`` may hold a usage (cheap: the JSON is parsed only when it may)."""
    return b'"usage"' in data or b"eval_count" in data


_MAX_LINE = 1 << 20


class UsageScanner:
    """Finds the usage in a stream passed on chunk by chunk: Server-Sent Events
    (``data: {...}``) or NDJSON lines. Only lines that name a usage are parsed."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n")
        # what follows the last newline is an unfinished line, kept for the next chunk
        rest = data[end + 1 :]
        self._partial = rest if len(rest) <= _MAX_LINE else b""
        # the common case, on every event: nothing to parse (no generator, no copies)
        if end < 0 or not _names_usage(data):
            return
        for line in data[:end].split(b"\n"):
            if not _names_usage(line):
                continue
            text = line.strip()
            if text.startswith(b"data:"):
                text = text[5:].strip()
            try:
                self.usage.take(json.loads(text))
            except (ValueError, UnicodeDecodeError):
                continue


def request_model(body: bytes) -> str | None:
    """The ``model`` a JSON request body names (OpenAI, Claude, Ollama requests all do)."""
    if not body.startswith(b"{") or b'"model"' not in body:
        return None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None
