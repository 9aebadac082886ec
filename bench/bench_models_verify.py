"""Time of ``models verify`` per GiB of model files, against hashing them.

``models verify`` reads each safetensors header and compares sizes; it never reads tensor
data. The alternative a user would reach for is hashing every file (``sha256sum``, what EXO
does once after a download): that reads every byte. Both run here on the same generated
models: a few large shards and many small ones, written in full (no sparse files, so the
hash reads real blocks). Both are timed with the page cache warm (the files were just
written), which favours hashing; on a cold cache hashing is bound by the disk, verify is not.
Usage: python -m bench.bench_models_verify [--gib 2] [-n 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from exo_nixos.models.verify import verify

MIB = 1 << 20


def make_model(root: Path, name: str, total_bytes: int, shards: int) -> None:
    """A model directory of ``shards`` safetensors files, ``total_bytes`` in all."""
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    per_shard = total_bytes // shards
    weight_map: dict[str, str] = {}
    rng = np.random.default_rng(0)
    for i in range(shards):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        elements = per_shard // 4 // 4
        tensors = {f"l{i}.w{j}": rng.random(elements, dtype=np.float32) for j in range(4)}
        save_file(tensors, directory / file_name)
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def hash_all(root: Path) -> int:
    total = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(8 * MIB):
                    digest.update(chunk)
                    total += len(chunk)
    return total


def median_s(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=2.0, help="size of each layout (GiB)")
    parser.add_argument("-n", type=int, default=5, help="runs per case (median)")
    args = parser.parse_args()
    total = int(args.gib * 1024 * MIB)
    layouts = {"8 large shards": 8, "256 small shards": 256}
    print(f"# models verify vs sha256 over {args.gib:g} GiB per layout, median of {args.n}")
    print(
        f"{'layout':<18} {'verify s':>9} {'verify s/GiB':>13} {'ms/file':>8} "
        f"{'CLI s':>7} {'sha256 s/GiB':>13} {'ratio':>8}"
    )
    for label, shards in layouts.items():
        with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
            root = Path(tmp)
            make_model(root, "org--model", total, shards)
            reports = verify([root])
            assert len(reports) == 1 and reports[0].clean, reports
            size_gib = reports[0].bytes / (1024 * MIB)
            verify_s = median_s(lambda r=root: verify([r]), args.n)
            cli = [sys.executable, "-m", "exo_nixos", "models", "verify", str(root)]
            cli_s = median_s(
                lambda c=cli: subprocess.run(c, capture_output=True, check=True), args.n
            )
            hash_s = median_s(lambda r=root: hash_all(r), max(1, args.n // 2))
            print(
                f"{label:<18} {verify_s:>9.4f} {verify_s / size_gib:>13.4f} "
                f"{verify_s / reports[0].files * 1000:>8.3f} {cli_s:>7.2f} "
                f"{hash_s / size_gib:>13.3f} {hash_s / verify_s:>7.0f}x"
            )


if __name__ == "__main__":
    main()
