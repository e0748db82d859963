"""Verified, resumable downloads and safe archive extraction.

* :func:`download` — HTTP(S) with ``Range`` resume into ``<file>.part``, a progress bar, SHA-256
  verification, and a rename only after the digest matches: an interrupted or corrupt transfer
  never leaves a file that looks complete.
* :func:`safe_extract` — tar/zip extraction that rejects absolute paths, ``..`` components,
  symbolic and hard links and device files, into ``<target>.partial`` renamed when complete.
* :func:`fetch_dataset` — the public datasets' official addresses and digests; ``source`` (an
  archive or folder, the ``--from`` option) for machines without internet. Offline without a
  source: a clear message naming the address and the ``--from`` alternative, never a hang.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm

from components.errors import DownloadError
from components.data.readers import convert_visa

__all__ = [
    "DATASET_SOURCES",
    "DownloadError",
    "ExtractLimits",
    "download",
    "fetch_dataset",
    "safe_extract",
    "sha256_file",
]

GIB = 1 << 30


@dataclass(frozen=True)
class ExtractLimits:
    """Limits on what an archive may extract to (decompression bombs), checked from its headers first.

    Generous defaults: Real-IAD, the largest supported dataset, is far below them.
    """

    max_bytes: int = 500 * GIB
    max_ratio: float = 200.0  # extracted bytes / archive bytes (images barely compress)
    max_members: int = 5_000_000

    def check(self, archive: Path, sizes: list[int]) -> None:
        """Raise :class:`DownloadError` naming the archive and the limit it exceeds."""
        total, packed = sum(sizes), max(archive.stat().st_size, 1)
        problems = []
        if len(sizes) > self.max_members:
            problems.append(f"{len(sizes)} members (limit {self.max_members})")
        if total > self.max_bytes:
            problems.append(f"{total / GIB:.1f} GiB extracted (limit {self.max_bytes / GIB:.1f} GiB)")
        if total / packed > self.max_ratio:
            problems.append(f"a compression ratio of {total / packed:.0f} (limit {self.max_ratio:g})")
        if problems:
            msg = (
                f"{archive}: refusing to extract: {', '.join(problems)}. This looks like a decompression bomb; "
                "if the archive is genuine, raise the limit (data.extract.* in params)."
            )
            raise DownloadError(msg)


DATASET_SOURCES: dict[str, dict[str, Any]] = {
    "mvtec": {
        "url": "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
        "420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        "sha256": "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        "archive": "mvtec_anomaly_detection.tar.xz",
    },
    "visa": {
        "url": "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        "sha256": "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        "archive": "VisA_20220922.tar",
        "split_csv": "https://raw.githubusercontent.com/amazon-science/spot-diff/main/split_csv/1cls.csv",
    },
    "dtd": {
        "url": "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        "sha256": "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
        "archive": "dtd-r1.0.1.tar.gz",
    },
    "realiad": {"url": None, "sha256": None, "archive": None, "note": "Real-IAD needs registration"},
    "mpdd": {"url": None, "sha256": None, "archive": None},
    "btad": {"url": None, "sha256": None, "archive": None},
}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None,
    timeout_s: float = 30.0,
    progress: bool = True,
    chunk: int = 1 << 16,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify SHA-256, then rename.

    Raises:
        DownloadError: network failure (the partial file is kept for resuming) or digest mismatch
            (the partial file is deleted: it can never be used).
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)  # noqa: S310 - http(s) only, checked below
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # already complete
            resp = None
        else:
            msg = f"download of {url} failed: HTTP {err.code}. Copy the file by hand and use --from <file>."
            raise DownloadError(msg) from err
    except (urllib.error.URLError, OSError) as err:
        msg = f"cannot reach {url} ({err}). Copy the file by hand and use --from <file>."
        raise DownloadError(msg) from err
    if resp is not None:
        with resp:
            resumed = have and resp.status == 206
            mode = "ab" if resumed else "wb"
            total = resp.headers.get("Content-Length")
            total_n = int(total) + (have if resumed else 0) if total else None
            try:
                bar_args = {"unit": "B", "unit_scale": True, "desc": dest.name, "leave": False}
                initial = have if resumed else 0
                with (
                    open(part, mode) as fh,
                    tqdm(total=total_n, initial=initial, disable=not progress, **bar_args) as bar,
                ):
                    while True:
                        block = resp.read(chunk)
                        if not block:
                            break
                        fh.write(block)
                        bar.update(len(block))
            except (OSError, socket.timeout) as err:
                msg = f"download of {url} interrupted ({err}); run the command again to resume."
                raise DownloadError(msg) from err
            if total_n is not None and part.stat().st_size < total_n:
                msg = f"download of {url} ended early ({part.stat().st_size}/{total_n} bytes); run again to resume."
                raise DownloadError(msg)
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink(missing_ok=True)
        msg = f"checksum mismatch for {url}: got {digest}, expected {sha256}. The file was deleted."
        raise DownloadError(msg)
    os.replace(part, dest)
    return dest


def _check_member(name: str, target: Path) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        msg = f"unsafe archive member {name!r} (absolute path or '..'): refusing to extract."
        raise DownloadError(msg)
    resolved = (target / p).resolve()
    if not str(resolved).startswith(str(target.resolve())):
        msg = f"archive member {name!r} escapes the target folder: refusing to extract."
        raise DownloadError(msg)


def safe_extract(
    archive: str | os.PathLike, target: str | os.PathLike, limits: ExtractLimits = ExtractLimits()
) -> Path:
    """Extract a tar(.gz/.xz/.bz2) or zip archive into ``target`` safely (see module docstring),
    within ``limits`` (total size, ratio, member count; checked before anything is written)."""
    archive, target = Path(archive), Path(target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, tmp)
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode == 0o120000:
                        msg = f"archive member {info.filename!r} is a symbolic link: refusing to extract."
                        raise DownloadError(msg)
                limits.check(archive, [info.file_size for info in zf.infolist()])
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(m.name, tmp)
                    if m.issym() or m.islnk():
                        msg = f"archive member {m.name!r} is a link: refusing to extract."
                        raise DownloadError(msg)
                    if not (m.isfile() or m.isdir()):
                        msg = f"archive member {m.name!r} is a device or special file: refusing to extract."
                        raise DownloadError(msg)
                limits.check(archive, [m.size for m in members])
                tf.extractall(tmp, members=members, filter="data")
        else:
            msg = f"{archive} is neither a tar nor a zip archive."
            raise DownloadError(msg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _reachable(url: str, timeout_s: float) -> str | None:
    host = urlparse(url).hostname or ""
    port = urlparse(url).port or (443 if url.startswith("https") else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{host} is unreachable ({err.__class__.__name__}: {err})"


def _single_child(folder: Path) -> Path:
    kids = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return kids[0] if len(kids) == 1 and kids[0].is_dir() else folder


def fetch_dataset(
    kind: str,
    raw_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    timeout_s: float = 5.0,
    limits: ExtractLimits = ExtractLimits(),
) -> Path:
    """Return a folder holding dataset ``kind`` ready for its reader.

    ``source``: a folder (used as is) or an archive (checksum verified when known, then safely
    extracted within ``limits``). Without it the official address is downloaded, unless the host is
    unreachable.
    """
    spec = DATASET_SOURCES.get(kind)
    if spec is None:
        msg = f"unknown dataset {kind!r}; known: {sorted(DATASET_SOURCES)}."
        raise DownloadError(msg)
    raw_dir = Path(raw_dir)
    done = raw_dir / ".complete"
    if source:
        src = Path(source)
        if src.is_dir():
            return _single_child(src) if kind != "visa" else _prepare_visa(src, raw_dir)
        if not src.is_file():
            msg = f"--from {src}: no such file or folder."
            raise DownloadError(msg)
        if spec.get("sha256") and src.name == spec.get("archive") and sha256_file(src) != spec["sha256"]:
            msg = f"{src}: SHA-256 does not match the official {spec['archive']} ({spec['sha256']})."
            raise DownloadError(msg)
        extracted = safe_extract(src, raw_dir / "extracted", limits)
        done.write_text(str(src))
        return _single_child(extracted) if kind != "visa" else _prepare_visa(extracted, raw_dir)
    if done.is_file() and (raw_dir / "extracted").is_dir():
        ex = raw_dir / "extracted"
        return _single_child(ex) if kind != "visa" else _prepare_visa(ex, raw_dir)
    url = spec.get("url")
    if not url:
        msg = f"{kind} has no public download address ({spec.get('note', 'manual download')}); use --from <folder or archive>."
        raise DownloadError(msg)
    reason = _reachable(url, timeout_s)
    if reason is not None:
        msg = (
            f"cannot download {kind}: {reason}. Official address: {url} (SHA-256 {spec['sha256']}). "
            f"On a machine without internet copy the archive here and run: inpformer prepare --dataset {kind} --from <archive>"
        )
        raise DownloadError(msg)
    archive = download(url, raw_dir / spec["archive"], spec["sha256"], timeout_s=timeout_s * 6)
    extracted = safe_extract(archive, raw_dir / "extracted", limits)
    done.write_text(url)
    return _single_child(extracted) if kind != "visa" else _prepare_visa(extracted, raw_dir)


def _prepare_visa(extracted: Path, raw_dir: Path) -> Path:
    root = extracted / "VisA_20220922" if (extracted / "VisA_20220922").is_dir() else extracted
    out = raw_dir / "mvtec_layout"
    if (out / ".complete").is_file():
        return out
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        csv_path = raw_dir / "1cls.csv"
        if not csv_path.is_file():
            url = DATASET_SOURCES["visa"]["split_csv"]
            if _reachable(url, 5.0) is not None:
                msg = f"VisA needs the official split {url}: copy it to {csv_path}."
                raise DownloadError(msg)
            download(url, csv_path, None)
    convert_visa(root, csv_path, out)
    (out / ".complete").write_text("ok")
    return out
