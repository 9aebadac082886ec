"""How EXO's output is cut into lines for the journal: every byte passes, long lines in pieces."""

from __future__ import annotations

from exo_nixos.supervisor.runner import LineSplitter


def _split(chunks: list[bytes], limit: int) -> list[bytes]:
    out: list[bytes] = []
    splitter = LineSplitter(out.append, limit)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.close()
    return out


def test_lines_pass_whole_however_the_pipe_cuts_them() -> None:
    assert _split([b"one\ntw", b"o\n", b"three\nfo", b"ur"], 100) == [
        b"one\n",
        b"two\n",
        b"three\n",
        b"four\n",
    ]


def test_a_long_line_is_passed_on_in_pieces_without_losing_a_byte() -> None:
    line = bytes(range(256)).replace(b"\n", b"") * 40  # 10200 bytes, no newline inside
    out = _split([line[:3000], line[3000:] + b"\n", b"next\n"], 1024)
    assert all(len(piece) <= 1025 for piece in out)
    assert b"".join(piece.removesuffix(b"\n") for piece in out[:-1]) == line
    assert out[-1] == b"next\n"


def test_nothing_is_emitted_for_empty_output() -> None:
    assert _split([], 10) == []
    assert _split([b""], 10) == []
