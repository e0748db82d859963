"""Verified, resumable downloads against a local HTTP server on 127.0.0.1; safe extraction."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from components.data.download import DownloadError, download, fetch_dataset, safe_extract

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class _Handler(BaseHTTPRequestHandler):
    cut_after: int | None = None  # close the connection after this many body bytes (once)
    requests: list[str] = []

    def log_message(self, *args) -> None:  # silence
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.headers.get("Range") or "")
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_after
        if cut is not None:
            type(self).cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    _Handler.cut_after = None
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    httpd.shutdown()
    httpd.server_close()


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_verifies_checksum(server, tmp_path) -> None:
    out = download(server, tmp_path / "f.bin", SHA, progress=False)
    assert out.read_bytes() == PAYLOAD


def test_checksum_mismatch_rejected_and_partial_not_used(server, tmp_path) -> None:
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(server, tmp_path / "f.bin", "0" * 64, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_resume_after_interrupted_transfer(server, tmp_path) -> None:
    _Handler.cut_after = 30_000
    with pytest.raises(DownloadError, match="run"):
        download(server, tmp_path / "f.bin", SHA, progress=False)
    assert not (tmp_path / "f.bin").exists()  # nothing that looks complete
    assert (tmp_path / "f.bin.part").stat().st_size == 30_000
    out = download(server, tmp_path / "f.bin", SHA, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert _Handler.requests[-1] == "bytes=30000-"


def test_unreachable_host_fails_fast_with_advice(tmp_path) -> None:
    with pytest.raises(DownloadError, match="--from"):
        download("http://127.0.0.1:9/nothing", tmp_path / "x", None, timeout_s=2, progress=False)


def _tar_with(tmp_path, name: str, kind: str = "file"):
    path = tmp_path / f"evil-{kind}.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        elif kind == "hardlink":
            info.type = tarfile.LNKTYPE
            info.linkname = "x"
            tf.addfile(info)
        else:
            data = b"hi"
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("name", "kind", "needle"),
    [("../escape.txt", "file", "unsafe"), ("/abs/path.txt", "file", "unsafe"),
     ("link", "symlink", "link"), ("hard", "hardlink", "link")],
)  # fmt: skip
def test_safe_extract_rejects(tmp_path, name, kind, needle) -> None:
    with pytest.raises(DownloadError, match=needle):
        safe_extract(_tar_with(tmp_path, name, kind), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert not (tmp_path.parent / "escape.txt").exists()


def test_safe_extract_zip_and_tar_ok(tmp_path) -> None:
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("root/x/y.txt", "ok")
    out = safe_extract(z, tmp_path / "z")
    assert (out / "root" / "x" / "y.txt").read_text() == "ok"
    bad = tmp_path / "b.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../../evil.txt", "no")
    with pytest.raises(DownloadError, match="unsafe"):
        safe_extract(bad, tmp_path / "zb")


def test_fetch_dataset_from_folder_and_archive(tmp_path) -> None:
    folder = tmp_path / "ds" / "mvtec_anomaly_detection"
    (folder / "bottle" / "train" / "good").mkdir(parents=True)
    assert fetch_dataset("mvtec", tmp_path / "raw", tmp_path / "ds") == folder
    arch = tmp_path / "data.tar"
    with tarfile.open(arch, "w") as tf:
        tf.add(folder, arcname="mvtec_anomaly_detection")
    got = fetch_dataset("mvtec", tmp_path / "raw2", arch)
    assert (got / "bottle" / "train" / "good").is_dir()
    with pytest.raises(DownloadError, match="no public download address"):
        fetch_dataset("realiad", tmp_path / "raw3")


def test_offline_fetch_names_address_and_from(tmp_path, monkeypatch) -> None:
    import components.data.download as dl

    monkeypatch.setattr(dl, "_reachable", lambda url, timeout_s: "www.mydrive.ch is unreachable (test)")
    with pytest.raises(DownloadError) as err:
        fetch_dataset("mvtec", tmp_path / "raw")
    msg = str(err.value)
    assert "mvtec_anomaly_detection.tar.xz" in msg and "--from" in msg and "cf4313b1" in msg
