"""Download public recommendation datasets, verified and extracted atomically.

    python -m data_pipeline download --list
    python -m data_pipeline download ml-1m --dest data/raw
    python -m data_pipeline download amazon2014-beauty --dest data/raw
    python -m data_pipeline download ml-1m --dest data/raw --base-url http://mirror.local/movielens

``<dest>/<name>/`` appears only when the dataset is complete: the file is streamed to a temporary
file, its digest checked, then it is extracted into a temporary directory that is renamed into
place. A second call with the same name returns at once (``--force`` downloads again).

Mirrors: ``--base-url URL`` (or the environment variable ``GENREC_DOWNLOAD_BASE_URL``) replaces
everything before the file name, so a mirror must serve ``<URL>/<file name>`` (e.g.
``<URL>/ml-1m.zip``). This is also how the tests serve files from a local HTTP server.

Checksums: the MovieLens entries carry the MD5 digests GroupLens publishes next to each archive
(``<archive>.md5`` on files.grouplens.org). The Amazon review files have no published checksum, so
their entries have ``checksum=None``: the first download computes the SHA-256, records it in
``<dest>/recorded_checksums.json`` and logs it with a warning (copy it into ``REGISTRY`` to pin it);
later downloads into the same ``dest`` are verified against that recorded value.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

BASE_URL_ENV = "GENREC_DOWNLOAD_BASE_URL"
RECORDED_CHECKSUMS = "recorded_checksums.json"
_CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A download that could not be completed; nothing partial is left behind."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected digest."""


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset lives and how to check and unpack it."""

    url: str
    # "md5:<hex>" or "sha256:<hex>"; None when no checksum is published (see the module docstring).
    checksum: str | None
    archive: Literal["zip", "gzip", "none"]
    # Expected size in bytes when known (checked after download), else None.
    size: int | None = None
    # What the files hold, for writing the prepare config.
    description: str = ""


_ML = "https://files.grouplens.org/datasets/movielens"
_AMAZON_2014 = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
_AMAZON_2018 = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/categoryFilesSmall"
_AMAZON_2014_FORMAT = "ratings CSV without header: user,item,rating,timestamp"
_AMAZON_2018_FORMAT = "ratings CSV without header: item,user,rating,timestamp (item first)"

REGISTRY: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource(
        f"{_ML}/ml-100k.zip",
        "md5:0e33842e24a9c977be4e0107933c0723",
        "zip",
        description="ml-100k/u.data: tab-separated user, item, rating, timestamp; no header",
    ),
    "ml-1m": DatasetSource(
        f"{_ML}/ml-1m.zip",
        "md5:c4d9eecfca2ab87c1945afe126590906",
        "zip",
        description="ml-1m/ratings.dat: UserID::MovieID::Rating::Timestamp; no header",
    ),
    "ml-20m": DatasetSource(
        f"{_ML}/ml-20m.zip",
        "md5:cd245b17a1ae2cc31bb14903e1204af3",
        "zip",
        description="ml-20m/ratings.csv: header userId,movieId,rating,timestamp",
    ),
    "amazon2014-beauty": DatasetSource(
        f"{_AMAZON_2014}/ratings_Beauty.csv", None, "none", description=_AMAZON_2014_FORMAT
    ),
    "amazon2014-sports": DatasetSource(
        f"{_AMAZON_2014}/ratings_Sports_and_Outdoors.csv", None, "none", description=_AMAZON_2014_FORMAT
    ),
    "amazon2014-toys": DatasetSource(
        f"{_AMAZON_2014}/ratings_Toys_and_Games.csv", None, "none", description=_AMAZON_2014_FORMAT
    ),
    "amazon2018-beauty": DatasetSource(
        f"{_AMAZON_2018}/All_Beauty.csv", None, "none", description=_AMAZON_2018_FORMAT
    ),
    "amazon2018-sports": DatasetSource(
        f"{_AMAZON_2018}/Sports_and_Outdoors.csv", None, "none", description=_AMAZON_2018_FORMAT
    ),
    "amazon2018-toys": DatasetSource(
        f"{_AMAZON_2018}/Toys_and_Games.csv", None, "none", description=_AMAZON_2018_FORMAT
    ),
}


def source_url(source: DatasetSource, base_url: str | None) -> str:
    """The URL to fetch: the registry URL, or ``<base_url>/<file name>`` for a mirror."""
    if not base_url:
        return source.url
    return base_url.rstrip("/") + "/" + _file_name(source)


def _file_name(source: DatasetSource) -> str:
    return Path(urlsplit(source.url).path).name


def download(name: str, dest: str | os.PathLike, base_url: str | None = None, force: bool = False) -> Path:
    """Download, verify and extract dataset ``name`` into ``<dest>/<name>``; return that directory.

    ``base_url`` defaults to ``$GENREC_DOWNLOAD_BASE_URL``. Raises ``ValueError`` for an unknown
    name, ``ChecksumError`` when the digest differs and ``DownloadError`` for HTTP/network
    failures; in every failure case nothing is left in ``dest`` but what was there before.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset '{name}'; known datasets: {', '.join(sorted(REGISTRY))}")
    source = REGISTRY[name]
    dest = Path(dest)
    target = dest / name
    if target.exists() and not force:
        logger.info("%s already present at %s (pass --force to download again)", name, target)
        return target
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    url = source_url(source, base_url)
    dest.mkdir(parents=True, exist_ok=True)
    file_name = _file_name(source)

    recorded = _read_recorded(dest)
    expected = source.checksum or recorded.get(name)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=dest) as work:
        work = Path(work)
        archive = work / file_name
        digests = _fetch(url, archive)
        actual_size = archive.stat().st_size
        if source.size is not None and actual_size != source.size:
            raise ChecksumError(
                f"{file_name} from {url}: expected {source.size} bytes, got {actual_size}; "
                "the file is truncated or changed upstream. Nothing was kept; retry or check the mirror."
            )
        if expected is not None:
            algorithm, _, want = expected.partition(":")
            got = digests[algorithm]
            if got != want.lower():
                raise ChecksumError(
                    f"{file_name} from {url}: {algorithm} mismatch, expected {want}, got {got}. "
                    "The download is corrupt or the file changed upstream; nothing was kept. Retry, "
                    "or if the new file is genuine, update the checksum in data_pipeline/download.py "
                    f"(or {dest / RECORDED_CHECKSUMS} for a recorded one)."
                )
        unpacked = work / "unpacked"
        _unpack(source.archive, archive, unpacked, file_name)
        root = _single_top_dir(unpacked) or unpacked
        info = {
            "name": name,
            "url": url,
            "file": file_name,
            "size": actual_size,
            "md5": digests["md5"],
            "sha256": digests["sha256"],
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (root / ".download.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():  # --force: move the old copy aside (deleted with `work`) only now
            os.replace(target, work / "previous")
        os.replace(root, target)
    if expected is None:
        recorded[name] = f"sha256:{digests['sha256']}"
        _write_recorded(dest, recorded)
        logger.warning(
            "%s has no published checksum; recorded sha256:%s in %s -- later downloads into %s are "
            "checked against it (copy it into REGISTRY in data_pipeline/download.py to pin it)",
            name,
            digests["sha256"],
            dest / RECORDED_CHECKSUMS,
            dest,
        )
    logger.info("%s ready at %s (%s)", name, target, source.description)
    return target


def _fetch(url: str, path: Path) -> dict[str, str]:
    """Stream ``url`` to ``path`` with progress logging; return its md5 and sha256 hex digests."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last_report, began = 0, time.monotonic(), time.monotonic()
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                md5.update(chunk)
                sha256.update(chunk)
                done += len(chunk)
                if time.monotonic() - last_report > 5:
                    last_report = time.monotonic()
                    pct = f" ({100 * done / total:.0f}%)" if total else ""
                    logger.info(
                        "  %.1f MiB%s, %.1f MiB/s", done / 2**20, pct, done / 2**20 / (last_report - began)
                    )
    except urllib.error.HTTPError as exc:
        raise DownloadError(
            f"download of {url} failed: HTTP {exc.code} {exc.reason}. Check the dataset name and, if "
            f"you use a mirror (--base-url or ${BASE_URL_ENV}), that it serves this file."
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"download of {url} failed: {reason}. Check the network or the mirror URL."
        ) from None
    if total and done != total:
        raise DownloadError(f"download of {url} stopped after {done} of {total} bytes; retry.")
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _unpack(kind: str, archive: Path, out_dir: Path, file_name: str) -> None:
    out_dir.mkdir()
    if kind == "zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                # extractall drops absolute paths and '..' components, so members stay inside out_dir.
                zf.extractall(out_dir)
        except zipfile.BadZipFile as exc:
            raise DownloadError(
                f"{file_name} is not a valid zip archive ({exc}); nothing was kept."
            ) from None
    elif kind == "gzip":
        try:
            with gzip.open(archive, "rb") as src, open(out_dir / file_name.removesuffix(".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK_BYTES)
        except (OSError, EOFError) as exc:
            raise DownloadError(f"{file_name} is not a valid gzip file ({exc}); nothing was kept.") from None
    else:
        os.replace(archive, out_dir / file_name)


def _single_top_dir(path: Path) -> Path | None:
    """The only entry of ``path`` if it is a directory (zips like ml-1m.zip wrap everything in one)."""
    entries = list(path.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return None


def _read_recorded(dest: Path) -> dict[str, str]:
    path = dest / RECORDED_CHECKSUMS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it") from None


def _write_recorded(dest: Path, recorded: dict[str, str]) -> None:
    path = dest / RECORDED_CHECKSUMS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline download NAME --dest DIR [--base-url URL] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline download", description="Download a dataset."
    )
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(REGISTRY)}")
    parser.add_argument("--dest", default="data/raw", help="directory to put <name>/ in (default data/raw)")
    parser.add_argument("--base-url", help=f"mirror serving <URL>/<file name> (or ${BASE_URL_ENV})")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.add_argument("--list", action="store_true", help="list the known datasets and exit")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name, source in REGISTRY.items():
            print(f"{name:20s} {source.url}\n{'':20s} {source.description}")
        return 0 if args.list else 2
    try:
        path = download(args.name, args.dest, base_url=args.base_url, force=args.force)
    except (DownloadError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    print(path)
    return 0
