"""Per-key policy: limits, allowed models, usage as EXO reports it, the policy file.

The limiter and the usage scanner in one process with a controlled clock; then the gateway
as a subprocess in front of the EXO test double: 429 with Retry-After and recovery, 403 for a
model outside the key's list, per-key usage in /metrics, a SIGHUP with a bad policy file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exo_nixos.config import KeyPolicy
from exo_nixos.errors import UserError
from exo_nixos.gateway.policy import (
    KEY_FIELDS,
    Limiter,
    PolicyStore,
    Refusal,
    Usage,
    UsageScanner,
    read_policy_file,
    request_model,
)
from exo_nixos.gateway.shared import SharedTable
from tests.exo_double.fixture import free_port, run_double
from tests.gateway_helpers import KEY_A, KEY_B, gateway_config, run_gateway, write_keys
from tests.test_gateway import MODEL, metric_samples, sse_events


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("exo_nixos.gateway.policy.time.monotonic", fake)
    return fake


def limiter(**policies: dict[str, Any]) -> Limiter:
    store = PolicyStore({k: KeyPolicy.model_validate(v) for k, v in policies.items()}, None)
    return Limiter(store, SharedTable(64, KEY_FIELDS))


def test_requests_per_minute_429_with_retry_after_and_recovery(clock: Clock):
    limits = limiter(alice={"requestsPerMinute": 2})
    first, second = limits.admit("alice", None), limits.admit("alice", None)
    assert isinstance(first, int) and isinstance(second, int)
    limits.done(first, "alice", 0)
    limits.done(second, "alice", 0)
    refused = limits.admit("alice", None)
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.limit, refused.retry_after) == (429, "requests_per_minute", 30)
    assert limits.admit("bob", None) is None  # no policy: not limited
    clock.now += 29
    assert isinstance(limits.admit("alice", None), Refusal)
    clock.now += 1.5
    assert isinstance(limits.admit("alice", None), int)


def test_concurrency_counts_requests_in_flight(clock: Clock):
    limits = limiter(alice={"concurrency": 1}, **{"*": {"concurrency": 5}})
    held = limits.admit("alice", None)
    assert isinstance(held, int)
    refused = limits.admit("alice", None)
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.limit, refused.retry_after) == (429, "concurrency", 1)
    assert isinstance(limits.admit("bob", None), int)  # "*": a policy of its own per key
    limits.done(held, "alice", 0)
    assert isinstance(limits.admit("alice", None), int)


def test_tokens_per_minute_are_taken_from_usage_and_refill(clock: Clock):
    limits = limiter(alice={"tokensPerMinute": 60})
    row = limits.admit("alice", None)
    assert isinstance(row, int)
    limits.done(row, "alice", 90)  # 30 over: in debt, refilled at one token a second
    refused = limits.admit("alice", None)
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.limit, refused.retry_after) == (429, "tokens_per_minute", 31)
    clock.now += 30.5
    assert isinstance(limits.admit("alice", None), int)


def test_a_model_outside_the_keys_list_is_403():
    limits = limiter(alice={"models": ["m1"]})
    refused = limits.admit("alice", "m2")
    assert isinstance(refused, Refusal) and (refused.status, refused.limit) == (403, "model")
    assert "m2" in refused.message and "alice" in refused.message
    assert isinstance(limits.admit("alice", "m1"), int)
    assert isinstance(limits.admit("alice", None), int)  # /v1/models names no model


def test_limits_hold_across_tables_sharing_memory_after_fork(clock: Clock):
    """Two workers' views of one table (as after fork): the concurrency is the sum."""
    limits = limiter(alice={"concurrency": 2})
    table = limits.table
    table.workers = 2
    table.width = table.fields + 2
    held = limits.admit("alice", None)
    assert isinstance(held, int)
    table.worker = 1
    assert isinstance(limits.admit("alice", None), int)
    assert isinstance(limits.admit("alice", None), Refusal)
    table.clear_worker(1)  # worker 1 died: its requests are let go
    assert isinstance(limits.admit("alice", None), int)


def upstream_stream(words: list[str], usage: dict[str, Any]) -> bytes:
    """A chat completion stream as upstream's generate_chat_stream writes it."""
    parts = [b": keep-alive\n\n"]
    for index, word in enumerate(words):
        chunk: dict[str, Any] = {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": word}}],
        }
        if index == len(words) - 1:
            chunk["choices"][0]["finish_reason"] = "stop"
            chunk["usage"] = usage
        parts.append(f"data: {json.dumps(chunk)}\n\n".encode())
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def test_usage_of_a_stream_split_anywhere():
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    raw = upstream_stream(["a ", "b ", "c"], usage)
    for size in (1, 7, 64, len(raw)):
        found = Usage()
        scanner = UsageScanner(found)
        for start in range(0, len(raw), size):
            scanner.feed(raw[start : start + size])
        assert (found.prompt, found.completion) == (7, 3), size


def test_usage_of_whole_answers_and_other_apis():
    found = Usage()
    found.take_body(json.dumps({"usage": {"prompt_tokens": 5, "completion_tokens": 2}}).encode())
    assert (found.prompt, found.completion) == (5, 2)
    claude = Usage()  # message_start, then message_delta (upstream's claude adapter)
    scanner = UsageScanner(claude)
    scanner.feed(b'event: message_start\ndata: {"message": {"usage": {"input_tokens": 9}}}\n\n')
    scanner.feed(b'event: message_delta\ndata: {"usage": {"output_tokens": 4}}\n\n')
    assert (claude.prompt, claude.completion) == (9, 4)
    ollama = Usage()
    UsageScanner(ollama).feed(b'{"done": true, "prompt_eval_count": 6, "eval_count": 8}\n')
    assert (ollama.prompt, ollama.completion) == (6, 8)
    assert request_model(b'{"model": "m", "messages": []}') == "m"
    assert request_model(b"not json") is None


def test_usage_of_responses_ollama_and_unusual_framing():
    """OpenAI responses put it in ``response.usage``; an Ollama answer may give only
    ``eval_count``; an SSE ``data:`` without its space is still data; a body that names a
    usage but is no JSON counts nothing and raises nothing."""
    responses = Usage()
    responses.take_body(
        b'{"type": "response.completed", "response": '
        b'{"usage": {"input_tokens": 4, "output_tokens": 9}}}'
    )
    assert (responses.prompt, responses.completion) == (4, 9)
    ollama = Usage()
    ollama.take_body(b'{"done": true, "eval_count": 8}')
    assert (ollama.prompt, ollama.completion) == (0, 8)
    tight = Usage()
    UsageScanner(tight).feed(b'data:{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n')
    assert (tight.prompt, tight.completion) == (3, 1)
    broken = Usage()
    broken.take_body(b'{"usage": {"prompt_tokens": 3')
    assert (broken.prompt, broken.completion) == (0, 0)


def test_policy_file_errors_are_one_line(tmp_path: Path):
    path = tmp_path / "policy.json"
    for text, fragment in [
        ("{", "not a JSON document"),
        ('{"al ice": {}}', "an API key's name"),
        ('{"alice": {"requestsPerMinute": 0}}', "alice.requestsPerMinute"),
        ('{"alice": {"rpm": 3}}', "alice.rpm"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError) as caught:
            read_policy_file(path)
        assert fragment in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="not found"):
        read_policy_file(tmp_path / "missing.json")
    # a FIFO would hold the reload for ever, a device or a huge file fill memory: refused
    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (1 << 20) + "{}")
    for where, reason in [
        (fifo, "not a regular file"),
        (zero, "not a regular file"),
        (huge, f"larger than {1 << 20} bytes"),
    ]:
        with pytest.raises(UserError) as caught:
            read_policy_file(where)
        assert str(caught.value) == f"{where}: cannot read the key policy file: {reason}"


def test_a_bad_policy_file_on_reload_keeps_the_old_policies(tmp_path: Path, caplog):
    path = tmp_path / "policy.json"
    path.write_text('{"alice": {"concurrency": 1}}')
    base = {"bob": KeyPolicy.model_validate({"concurrency": 3})}
    store = PolicyStore(base, path)
    assert store.of("alice") == KeyPolicy(concurrency=1)
    path.write_text('{"alice": {"concurrency": "many"}}')
    assert asyncio.run(store.reload()) is False
    assert store.of("alice") == KeyPolicy(concurrency=1)
    (refused,) = [r.getMessage() for r in caplog.records if r.name == "exo_nixos.gateway.policy"]
    assert refused.startswith("key policies not reloaded, keeping the 2 loaded: "), refused
    assert "alice.concurrency" in refused
    caplog.clear()
    caplog.set_level(logging.INFO, logger="exo_nixos.gateway.policy")
    path.write_text('{"bob": {"concurrency": 9}}')  # the file's entry replaces the config's
    assert asyncio.run(store.reload()) is True
    assert store.of("bob") == KeyPolicy(concurrency=9) and store.of("alice") is None
    assert caplog.messages == [f"key policies reloaded from {path}: 1 entries"]
    # policies from the config alone: nothing to read, nothing that can fail
    assert asyncio.run(PolicyStore(base, None).reload()) is True


# --- the gateway in front of the double ---------------------------------------------------

AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH = {"alice": AUTH_A, "bob": {"Authorization": f"Bearer {KEY_B}"}}


def completion(prompt: str, *, stream: bool, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


def say(words: int, *, stream: bool) -> dict[str, Any]:
    return completion(" ".join(["word"] * words), stream=stream)


async def post(
    url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def answer_usage(body: bytes, stream: bool) -> tuple[int, int]:
    document = json.loads(sse_events(body)[-2]) if stream else json.loads(body)
    return document["usage"]["prompt_tokens"], document["usage"]["completion_tokens"]


def key_samples(text: str) -> dict[tuple[str, str, str], float]:
    """Per-key series: (metric, key, model) -> value."""
    out: dict[tuple[str, str, str], float] = {}
    for name, samples in metric_samples(text).items():
        if name.startswith("exo_gateway_key_"):
            for sample in samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    out[name, labels["key"], labels.get("model", labels.get("limit", ""))] = (
                        sample.value
                    )
    return out


def test_limits_models_usage_and_reload_through_the_gateway(tmp_path: Path):
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\nbob:{KEY_B}\n")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"alice": {"requestsPerMinute": 4, "models": [MODEL]}}))
    with run_double("--instance", MODEL) as double:
        config = gateway_config(
            port=free_port(),
            keys_file=keys,
            static_backends=[double.url],
            policy_file=policy,
            public_paths=["/health", "/metrics"],
        )
        with run_gateway(config) as gateway:

            async def scenario() -> None:
                used = {"alice": [0, 0], "bob": [0, 0]}

                async def ok(who: str, body: dict[str, Any]) -> None:
                    status, _, raw = await post(gateway.url, body, AUTH[who])
                    assert status == 200, raw
                    prompt, completed = answer_usage(raw, body["stream"])
                    used[who][0] += prompt
                    used[who][1] += completed

                for n in range(1, 5):  # streamed and not, two each per key
                    await ok("alice" if n <= 2 else "bob", say(n, stream=n % 2 == 0))
                # a model outside alice's list: 403, not counted against her rpm
                status, _, body = await post(
                    gateway.url, completion("x", stream=False, model="other/m"), AUTH_A
                )
                assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"
                await ok("alice", say(5, stream=True))
                await ok("alice", say(6, stream=False))
                status, headers, body = await post(gateway.url, say(7, stream=False), AUTH_A)
                assert status == 429 and 1 <= int(headers["Retry-After"]) <= 15
                assert json.loads(body)["error"]["type"] == "rate_limit_error"
                await ok("bob", say(8, stream=False))  # another key is unaffected

                async with (
                    aiohttp.ClientSession() as session,
                    session.get(gateway.url + "/metrics") as response,
                ):
                    text = await response.text()
                assert KEY_A not in text and KEY_B not in text
                series = key_samples(text)
                assert series["exo_gateway_key_requests", "alice", MODEL] == 4
                assert series["exo_gateway_key_requests", "alice", ""] == 2  # the 403, the 429
                assert series["exo_gateway_key_requests", "bob", MODEL] == 3
                assert series["exo_gateway_key_limited", "alice", "model"] == 1
                assert series["exo_gateway_key_limited", "alice", "requests_per_minute"] == 1
                for who in ("alice", "bob"):
                    assert series["exo_gateway_key_prompt_tokens", who, MODEL] == used[who][0]
                    assert series["exo_gateway_key_completion_tokens", who, MODEL] == used[who][1]

            asyncio.run(scenario())

            # a bad policy file on SIGHUP: the old policy stays (alice still limited)
            policy.write_text('{"alice": {"requestsPerMinute": "lots"}}')
            gateway.signal(signal.SIGHUP)
            gateway.wait_for_log("key policies not reloaded")
            status, _, _ = asyncio.run(post(gateway.url, say(1, stream=False), AUTH_A))
            assert status == 429
            # a good one: the new policy applies
            policy.write_text('{"alice": {"concurrency": 4}}')
            gateway.signal(signal.SIGHUP)
            gateway.wait_for_log("key policies reloaded")
            status, _, _ = asyncio.run(post(gateway.url, say(1, stream=False), AUTH_A))
            assert status == 200


def test_check_reads_the_policy_file_and_policies_need_keys(tmp_path: Path):
    """`gateway --check` (the unit's ExecReload) fails on a bad policy file, so a reload
    with one fails visibly; policies without a key file are a config error."""
    from exo_nixos.config import parse_config
    from exo_nixos.errors import ConfigError
    from exo_nixos.gateway.server import check

    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    policy = tmp_path / "policy.json"
    policy.write_text('{"alice": {"concurrency": 2}, "*": {"requestsPerMinute": 5}}')
    document = gateway_config(
        port=free_port(), keys_file=keys, policy_file=policy, static_backends=["http://127.0.0.1:1"]
    )
    document["gateway"]["keyPolicies"] = {"bob": {"concurrency": 1}}
    assert check(parse_config(document)).endswith("1 API keys, 3 key policies")
    policy.write_text('{"alice": {"concurrency": -1}}')
    with pytest.raises(UserError, match=r"alice\.concurrency"):
        check(parse_config(document))
    del document["gateway"]["apiKeysFile"]
    with pytest.raises(ConfigError, match="set apiKeysFile"):
        parse_config(document)
