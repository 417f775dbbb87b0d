"""tools/yardstick.py's readers, on files made here: a dictd database and an R lazy-load database."""

from __future__ import annotations

import gzip
import struct
import zlib

from yardstick import DOMAINS, dictd_entries, r_lazyload_strings, trim

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    out = ""
    while True:
        out = B64[n % 64] + out
        n //= 64
        if n == 0:
            return out


def test_dictd_entries_skip_the_database_headers(tmp_path):
    entries = [
        ("00-database-info", "header text\n"),
        ("apple", "apple\n  A fruit.\n"),
        ("zebra", "zebra\n  A horse.\n"),
    ]
    data, index, offset = b"", [], 0
    for word, body in entries:
        raw = body.encode()
        index.append(f"{word}\t{_b64(offset)}\t{_b64(len(raw))}")
        data += raw
        offset += len(raw)
    (tmp_path / "x.dict.dz").write_bytes(gzip.compress(data))
    (tmp_path / "x.index").write_text("\n".join(index[::-1]) + "\n")  # index order is not file order
    assert dictd_entries(tmp_path / "x.dict.dz") == "apple\n  A fruit.\n\nzebra\n  A horse."


def _xdr_strings(strings: list[str]) -> bytes:
    body = b"X\n" + struct.pack(">III", 3, 0x040200, 0x030500)
    body += struct.pack(">Ii", 16, len(strings))  # STRSXP
    for s in strings:
        raw = s.encode()
        body += struct.pack(">Ii", 0x00040009, len(raw)) + raw  # CHARSXP, UTF-8 flag
    return body


def test_r_lazyload_strings_reads_each_object(tmp_path):
    books = [["It is a truth", "universally acknowledged,"], ["Emma Woodhouse,", "handsome, clever"]]
    blob = b""
    for book in books:
        raw = _xdr_strings(book)
        blob += struct.pack(">I", len(raw)) + zlib.compress(raw)
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    assert r_lazyload_strings(tmp_path / "Rdata.rdb") == books


def test_trim_cuts_at_a_paragraph_and_splits_are_disjoint():
    text = "\n\n".join(f"paragraph {i} " * 20 for i in range(200))
    cut = trim(text, 5000)
    assert len(cut) <= 5000 and text.startswith(cut) and text[len(cut) : len(cut) + 2] == "\n\n"
    assert not set(DOMAINS["validation"]) & set(DOMAINS["test"]), (
        "a domain is tuned on or reported on, not both"
    )
    assert len(DOMAINS["validation"]) + len(DOMAINS["test"]) >= 5
