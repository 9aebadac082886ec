"""``exo-nixos models verify``: damaged caches found offline, quarantined, never deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exo_nixos.models.verify import Owner, check_model_dir, quarantine, verify
from tests.models_cache import garble_header, make_model, truncate, write_shard


def _kinds(directory: Path, **kw: object) -> dict[str, str]:
    report = check_model_dir(directory, **kw)  # type: ignore[arg-type]
    return {d.path.name: d.kind for d in report.damage}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", "models", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_clean_model_is_clean(tmp_path: Path) -> None:
    model = make_model(tmp_path)
    report = check_model_dir(model)
    assert report.clean, report.damage
    assert report.files == 4


def test_truncated_and_corrupt_shards_are_found(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=3)
    truncate(model / "model-00001-of-00003.safetensors")
    garble_header(model / "model-00002-of-00003.safetensors")
    assert _kinds(model) == {
        "model-00001-of-00003.safetensors": "truncated",
        "model-00002-of-00003.safetensors": "header",
    }


def test_a_file_longer_than_its_header_says_is_found(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=1)
    shard = model / "model-00001-of-00001.safetensors"
    with shard.open("ab") as handle:
        handle.write(b"\0" * 4)
    assert _kinds(model) == {shard.name: "truncated"}


def test_a_missing_shard_is_found_and_not_movable(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=2)
    (model / "model-00002-of-00002.safetensors").unlink()
    report = check_model_dir(model)
    assert [(d.path.name, d.kind, d.movable) for d in report.damage] == [
        ("model-00002-of-00002.safetensors", "missing-shard", False)
    ]


def test_a_shard_being_downloaded_is_not_missing(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=2)
    shard = model / "model-00002-of-00002.safetensors"
    shard.rename(shard.with_name(shard.name + ".partial"))
    report = check_model_dir(model)
    assert report.clean
    assert any("download in progress" in n for n in report.notes)


def test_an_old_partial_file_is_a_leftover(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=1)
    leftover = model / "tokenizer.json.partial"
    leftover.write_bytes(b"{")
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert _kinds(model) == {"tokenizer.json.partial": "partial"}


def test_an_index_naming_tensors_a_shard_lacks(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=1)
    write_shard(model / "model-00001-of-00001.safetensors", {"other": 4})
    assert _kinds(model) == {"model-00001-of-00001.safetensors": "missing-tensor"}


def test_an_index_that_does_not_parse(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=1)
    (model / "model.safetensors.index.json").write_text("{not json")
    assert _kinds(model) == {"model.safetensors.index.json": "index"}


def test_wrong_owner_is_reported(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=1)
    me = os.getuid()
    assert check_model_dir(model, owner=Owner(me)).clean
    kinds = {d.kind for d in check_model_dir(model, owner=Owner(me + 1)).damage}
    assert kinds == {"owner"}


def test_world_writable_files_are_reported(tmp_path: Path) -> None:
    model = make_model(tmp_path, shards=1)
    (model / "config.json").chmod(0o666)
    assert _kinds(model, owner=Owner(os.getuid())) == {"config.json": "mode"}


def test_quarantine_moves_damaged_files_and_never_deletes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    model = make_model(models, shards=2)
    bad = model / "model-00001-of-00002.safetensors"
    truncate(bad)
    size = bad.stat().st_size
    (model / "model-00002-of-00002.safetensors").unlink()  # missing: nothing to move
    reports = verify([models])
    moved = quarantine(reports, tmp_path / "q", stamp="S")
    assert moved == 1
    target = tmp_path / "q" / "S" / model.name / bad.name
    assert target.stat().st_size == size
    assert not bad.exists()
    reasons = json.loads((tmp_path / "q" / "S" / "reasons.json").read_text())
    assert [r["kind"] for r in reasons] == ["truncated"]
    # the rest of the model is untouched
    assert (model / "config.json").exists()


def test_cli_exit_codes_and_repair(tmp_path: Path) -> None:
    models = tmp_path / "models"
    model = make_model(models, shards=2)
    clean = run_cli(str(models))
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("ok ")
    garble_header(model / "model-00002-of-00002.safetensors")
    found = run_cli(str(models))
    assert found.returncode == 1
    assert "header does not parse" in found.stdout
    assert "--repair" in found.stdout
    repaired = run_cli("--repair", "--quarantine", str(tmp_path / "q"), str(models))
    assert repaired.returncode == 1  # damage was found (and moved)
    assert "1 file(s) moved" in repaired.stdout
    assert run_cli(str(models)).returncode == 1  # the shard is missing now ...
    assert "missing-shard" in run_cli(str(models)).stdout  # ... until EXO fetches it again
    assert list((tmp_path / "q").glob("*/*/model-00002-of-00002.safetensors"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["/nonexistent-dir"], "not a directory"),
        (["--owner", "no-such-user-xyz", "."], "no user"),
        (["--repair", "."], "--repair needs --quarantine"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_json(tmp_path: Path) -> None:
    model = make_model(tmp_path / "models", shards=1)
    truncate(model / "model-00001-of-00001.safetensors")
    done = run_cli("--json", str(tmp_path / "models"))
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert doc["clean"] is False
    assert doc["models"][0]["damage"][0]["kind"] == "truncated"


def test_cli_with_a_config_checks_its_dirs_and_never_repairs_read_only_ones(
    tmp_path: Path,
) -> None:
    import grp
    import pwd

    writable = tmp_path / "models"
    shared = tmp_path / "shared"
    good = make_model(writable, shards=1)
    truncate(make_model(shared, shards=1) / "model-00001-of-00001.safetensors")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "schemaVersion": 1,
                "modelsDir": str(writable),
                "readOnlyModelDirs": [str(shared)],
                "security": {
                    "user": pwd.getpwuid(os.getuid()).pw_name,
                    "group": grp.getgrgid(os.getgid()).gr_name,
                    "dataDir": str(tmp_path / "data"),
                },
            }
        )
    )
    done = run_cli("--config", str(config), "--repair")
    assert done.returncode == 1
    assert f"ok      {good}" in done.stdout
    assert "truncated" in done.stdout
    assert "0 file(s) moved" in done.stdout  # the read-only dir is left as it is
    assert (shared / "mlx-community--Tiny-4bit" / "model-00001-of-00001.safetensors").exists()
