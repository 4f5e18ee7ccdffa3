"""Tests for ``data_pipeline.download`` against a local HTTP server on 127.0.0.1 (loopback only)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import threading
import zipfile

import pytest

from data_pipeline import download as dl


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def do_GET(self):
        _QuietHandler.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve ``tmp_path/served`` on a random loopback port; yields (directory, base_url)."""
    served = tmp_path / "served"
    served.mkdir()
    # Requests to 127.0.0.1 must never go through a proxy from the environment.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)
    _QuietHandler.requests = []
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/mirror"
    httpd.shutdown()
    httpd.server_close()


def _served_zip(served, name="tiny.zip", content=b"1\t10\t5\t881250949\n"):
    # The server maps /mirror/<file> to served/mirror/<file>.
    (served / "mirror").mkdir(exist_ok=True)
    path = served / "mirror" / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tiny/u.data", content)
        zf.writestr("tiny/README", b"test archive\n")
    return path


def _register(monkeypatch, name, file_name, checksum, archive="zip"):
    registry = dict(dl.REGISTRY)
    registry[name] = dl.DatasetSource(f"https://example.invalid/data/{file_name}", checksum, archive)
    monkeypatch.setattr(dl, "REGISTRY", registry)


def _sha256(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_extracts_and_skips_second_time(server, tmp_path, monkeypatch):
    served, base_url = server
    archive = _served_zip(served)
    _register(monkeypatch, "tiny", "tiny.zip", _sha256(archive))
    dest = tmp_path / "raw"
    out = dl.download("tiny", dest, base_url=base_url)
    assert out == dest / "tiny"
    assert (out / "u.data").read_bytes() == b"1\t10\t5\t881250949\n"
    info = json.loads((out / ".download.json").read_text())
    assert info["sha256"] == _sha256(archive).split(":")[1]
    assert info["md5"] == hashlib.md5(archive.read_bytes()).hexdigest()
    assert sorted(p.name for p in dest.iterdir()) == ["tiny"], "no temporary files may remain"
    assert _QuietHandler.requests == ["/mirror/tiny.zip"]
    # Present already: no second request.
    assert dl.download("tiny", dest, base_url=base_url) == out
    assert len(_QuietHandler.requests) == 1


def test_md5_checksum_and_env_base_url(server, tmp_path, monkeypatch):
    served, base_url = server
    archive = _served_zip(served)
    _register(monkeypatch, "tiny", "tiny.zip", "md5:" + hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setenv(dl.BASE_URL_ENV, base_url)
    assert dl.main(["tiny", "--dest", str(tmp_path / "raw")]) == 0
    assert (tmp_path / "raw" / "tiny" / "u.data").is_file()


def test_checksum_mismatch_is_clear_and_leaves_nothing(server, tmp_path, monkeypatch):
    served, base_url = server
    _served_zip(served)
    wrong = "sha256:" + "0" * 64
    _register(monkeypatch, "tiny", "tiny.zip", wrong)
    dest = tmp_path / "raw"
    with pytest.raises(dl.ChecksumError) as excinfo:
        dl.download("tiny", dest, base_url=base_url)
    message = str(excinfo.value)
    actual = _sha256(served / "mirror" / "tiny.zip").split(":")[1]
    assert "tiny.zip" in message and "0" * 64 in message and actual in message
    assert list(dest.iterdir()) == []
    assert dl.main(["tiny", "--dest", str(dest), "--base-url", base_url]) == 1


def test_http_404_is_clear_and_leaves_nothing(server, tmp_path, monkeypatch):
    _, base_url = server
    _register(monkeypatch, "missing", "missing.zip", "sha256:" + "0" * 64)
    dest = tmp_path / "raw"
    with pytest.raises(dl.DownloadError, match=r"HTTP 404.*") as excinfo:
        dl.download("missing", dest, base_url=base_url)
    assert f"{base_url}/missing.zip" in str(excinfo.value)
    assert list(dest.iterdir()) == []


def test_unknown_name_lists_known_datasets(tmp_path):
    with pytest.raises(ValueError, match="ml-1m"):
        dl.download("ml-2m", tmp_path)


def test_unpublished_checksum_is_recorded_then_enforced(server, tmp_path, monkeypatch):
    served, base_url = server
    (served / "mirror").mkdir()
    plain = served / "mirror" / "ratings_Tiny.csv"
    plain.write_bytes(b"A1,B1,5.0,1400000000\n")
    _register(monkeypatch, "tiny-csv", "ratings_Tiny.csv", None, archive="none")
    dest = tmp_path / "raw"
    out = dl.download("tiny-csv", dest, base_url=base_url)
    assert (out / "ratings_Tiny.csv").read_bytes() == plain.read_bytes()
    recorded = json.loads((dest / dl.RECORDED_CHECKSUMS).read_text())
    assert recorded == {"tiny-csv": _sha256(plain)}
    # The file changes upstream: a forced re-download must fail against the recorded digest and keep
    # the good copy.
    plain.write_bytes(b"A1,B1,1.0,1400000000\n")
    with pytest.raises(dl.ChecksumError, match="ratings_Tiny.csv"):
        dl.download("tiny-csv", dest, base_url=base_url, force=True)
    assert (out / "ratings_Tiny.csv").read_bytes() == b"A1,B1,5.0,1400000000\n"
    assert sorted(p.name for p in dest.iterdir()) == [dl.RECORDED_CHECKSUMS, "tiny-csv"]


def test_gzip_and_force_replace(server, tmp_path, monkeypatch):
    served, base_url = server
    (served / "mirror").mkdir()
    packed = served / "mirror" / "data.csv.gz"
    packed.write_bytes(gzip.compress(b"u,i\n1,2\n", mtime=0))
    _register(monkeypatch, "gz", "data.csv.gz", _sha256(packed), archive="gzip")
    dest = tmp_path / "raw"
    out = dl.download("gz", dest, base_url=base_url)
    assert (out / "data.csv").read_bytes() == b"u,i\n1,2\n"
    (out / "stale.txt").write_text("old")
    assert dl.download("gz", dest, base_url=base_url, force=True) == out
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["gz"]


def test_registry_entries_are_well_formed():
    for name, source in dl.REGISTRY.items():
        assert source.url.startswith(("http://", "https://")), name
        assert source.archive in ("zip", "gzip", "none"), name
        if source.checksum is not None:
            algorithm, _, digest = source.checksum.partition(":")
            assert algorithm in ("md5", "sha256") and len(digest) == {"md5": 32, "sha256": 64}[algorithm]
    assert {"ml-100k", "ml-1m", "ml-20m"} <= set(dl.REGISTRY)
