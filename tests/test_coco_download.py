"""COCO acquisition against a local HTTP server: checksums, resumption, faults and retries, seeded subsets."""

from __future__ import annotations

import hashlib
import io
import json
import random
import logging
import re
import shutil
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from detr_sparsity.data.coco import (
    Archive,
    ChecksumError,
    InvalidImageError,
    choose_images,
    download_file,
    fetch_image,
    mirror_url,
    prepare_coco,
    subset_annotations,
)
from detr_sparsity.data.dataset import DataError
from detr_sparsity.data.download import DownloadError, DownloadSettings, HTTPStatusError

# Short waits keep the fault tests fast; the real values are in params.yaml.
ONCE = DownloadSettings(timeout_s=2.0, retries=0, backoff_s=0.0)
STALL_TIMEOUT_S = 0.3

ANNOTATED_TRAIN_IDS = set(range(101, 109))  # 109 has only a crowd annotation, 110 none


@dataclass
class FakeServer:
    """State of the local test server: served files, behaviour switches, requests seen."""

    root: Path
    url: str = ""
    cut_after: int | None = None  # send only this many body bytes, then close the connection
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    honor_range: bool = True
    stall_after: int | None = None  # send this many body bytes, then nothing until the test ends
    # Answered first, one per request: an HTTP status, "drop" (close without answering) or "silent".
    failures: list[int | str] = field(default_factory=list)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # ends every stall


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        fake: FakeServer = self.server.fake
        range_header = self.headers.get("Range")
        fake.requests.append((self.path, range_header))
        if fake.failures:
            failure = fake.failures.pop(0)
            if failure == "silent":
                fake.release.wait(10)
            elif failure != "drop":
                self.send_error(failure)
            self.close_connection = True
            return
        path = fake.root / self.path.lstrip("/")
        if ".." in self.path or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if range_header and fake.honor_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if fake.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.close_connection = True
        self.end_headers()
        if fake.stall_after is not None:
            self.wfile.write(body[: fake.stall_after])
            fake.release.wait(10)
            return
        if fake.cut_after is not None:
            body = body[: fake.cut_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    fake = FakeServer(root=tmp_path / "served")
    fake.root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.fake = fake
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _small_zip(path: Path) -> bytes:
    """Write a zip holding ~200 KB of seeded random bytes; return the zip's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("payload.bin", random.Random(0).randbytes(200_000))
    return path.read_bytes()


@pytest.fixture
def served_zip(server):
    data = _small_zip(server.root / "zips/small.zip")
    return f"{server.url}/zips/small.zip", data


def test_download_verifies_md5(served_zip, tmp_path):
    url, data = served_zip
    dest = tmp_path / "cache/small.zip"
    assert download_file(url, dest, size=len(data), md5=_md5(data), settings=ONCE) == dest
    assert dest.read_bytes() == data
    assert not dest.with_name("small.zip.part").exists()


def test_md5_mismatch_removes_download(served_zip, tmp_path):
    url, data = served_zip
    dest = tmp_path / "small.zip"
    with pytest.raises(ChecksumError) as error:
        download_file(url, dest, size=len(data), md5="0" * 32, settings=ONCE)
    message = str(error.value)
    assert "md5 mismatch" in message and url in message
    assert "0" * 32 in message and _md5(data) in message
    assert not dest.exists()
    assert not dest.with_name("small.zip.part").exists()


def test_size_mismatch_is_a_clear_error(served_zip, tmp_path):
    url, data = served_zip
    dest = tmp_path / "small.zip"
    expected = f"size mismatch.*expected {len(data) - 1} bytes, got {len(data)} bytes"
    with pytest.raises(ChecksumError, match=expected):
        download_file(url, dest, size=len(data) - 1, md5=_md5(data), settings=ONCE)
    assert not dest.exists()
    assert not dest.with_name("small.zip.part").exists()


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "no-content-length"])
def test_interrupted_download_resumes_with_range(server, served_zip, tmp_path, send_length):
    url, data = served_zip
    dest = tmp_path / "small.zip"
    part = dest.with_name("small.zip.part")
    cut = 50_000

    server.cut_after, server.send_length = cut, send_length
    with pytest.raises(DownloadError) as error:
        download_file(url, dest, size=len(data), md5=_md5(data), settings=ONCE)
    # Without a Content-Length the archive's known size tells the cut.
    assert str(error.value) == (
        f"{url} closed the connection after 50,000 of {len(data):,} bytes; gave up after 1 attempt; "
        f"rerun to resume: 50,000 of {len(data):,} bytes kept in {part}"
    )
    assert part.stat().st_size == cut
    assert not dest.exists()

    server.cut_after = None
    server.requests.clear()
    download_file(url, dest, size=len(data), md5=_md5(data), settings=ONCE)
    assert server.requests == [("/zips/small.zip", f"bytes={cut}-")]
    assert dest.read_bytes() == data
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, served_zip, tmp_path):
    url, data = served_zip
    dest = tmp_path / "small.zip"
    dest.with_name("small.zip.part").write_bytes(b"garbage that must be discarded")
    server.honor_range = False
    download_file(url, dest, size=len(data), md5=_md5(data), settings=ONCE)
    assert server.requests[0][1] is not None  # a Range was asked for ...
    assert dest.read_bytes() == data  # ... and the full 200 answer replaced the partial file


def test_verified_file_needs_no_request(server, served_zip, tmp_path):
    url, data = served_zip
    dest = tmp_path / "small.zip"
    download_file(url, dest, size=len(data), md5=_md5(data), settings=ONCE)
    server.requests.clear()
    download_file(url, dest, size=len(data), md5=_md5(data), settings=ONCE)
    assert server.requests == []


def test_fetch_image_rejects_undecodable_bytes(server, tmp_path):
    (server.root / "bad.jpg").write_bytes(b"not a jpeg")
    url = f"{server.url}/bad.jpg"
    with pytest.raises(RuntimeError, match=re.escape(url)):
        fetch_image(url, tmp_path / "bad.jpg", ONCE)
    assert list(tmp_path.glob("bad.jpg*")) == []


# --- faults: cut, stalled and refused transfers, retries ----------------------------------


@pytest.fixture
def served_image(server):
    """A JPEG of ~20 KB (noise does not compress) served at /train2017/x.jpg."""
    data = _noisy_jpeg()
    (server.root / "train2017").mkdir()
    (server.root / "train2017/x.jpg").write_bytes(data)
    return f"{server.url}/train2017/x.jpg", data


def _noisy_jpeg() -> bytes:
    noise = random.Random(0).randbytes(96 * 64 * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (96, 64), noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(dest.name + "*"))


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "no-content-length"])
def test_cut_image_is_kept_and_resumed(server, served_image, tmp_path, send_length):
    url, data = served_image
    dest, part = tmp_path / "x.jpg", tmp_path / "x.jpg.part"
    half = len(data) // 2

    server.cut_after, server.send_length = half, send_length
    with pytest.raises(DownloadError) as error:
        fetch_image(url, dest, ONCE)
    message = str(error.value)
    if send_length:
        assert message == (
            f"{url} closed the connection after {half:,} of {len(data):,} bytes; gave up after 1 attempt; "
            f"rerun to resume: {half:,} of {len(data):,} bytes kept in {part}"
        )
    else:  # only decoding tells that the image was cut
        assert message.startswith(f"{url} sent {half:,} bytes: the file does not decode fully (image file is truncated")
        assert message.endswith(f"; gave up after 1 attempt; rerun to resume: {half:,} bytes kept in {part}")
    assert _leftovers(dest) == ["x.jpg.part"] and part.read_bytes() == data[:half]

    server.cut_after = None
    server.requests.clear()
    assert fetch_image(url, dest, ONCE) == dest
    assert server.requests == [("/train2017/x.jpg", f"bytes={half}-")]
    assert dest.read_bytes() == data and _leftovers(dest) == ["x.jpg"]


def test_retries_resume_a_cut_image_within_one_call(server, served_image, tmp_path, caplog):
    url, data = served_image
    server.cut_after = len(data) // 2 + 1  # each answer brings a little over half of what was asked for
    settings = DownloadSettings(timeout_s=2.0, retries=2, backoff_s=0.01)
    with caplog.at_level(logging.WARNING):
        fetch_image(url, tmp_path / "x.jpg", settings)
    assert (tmp_path / "x.jpg").read_bytes() == data
    assert server.requests == [("/train2017/x.jpg", None), ("/train2017/x.jpg", f"bytes={len(data) // 2 + 1}-")]
    assert f"{url} closed the connection after" in caplog.text and "(attempt 1 of 3); retrying in 0.01 s" in caplog.text


@pytest.mark.parametrize("what", ["archive", "image"])
def test_stalled_transfer_keeps_bytes_and_resumes(server, served_zip, served_image, tmp_path, what):
    url, data = served_zip if what == "archive" else served_image
    dest = tmp_path / url.rsplit("/", 1)[1]
    part = dest.with_name(dest.name + ".part")
    kept = 5_000
    settings = DownloadSettings(timeout_s=STALL_TIMEOUT_S, retries=0, backoff_s=0.0)

    def get():
        if what == "archive":
            return download_file(url, dest, size=len(data), md5=_md5(data), settings=settings)
        return fetch_image(url, dest, settings)

    server.stall_after = kept
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        get()
    assert time.monotonic() - start < 5 * STALL_TIMEOUT_S
    assert str(error.value) == (
        f"no data from {url} for {STALL_TIMEOUT_S:g} s; gave up after 1 attempt; "
        f"rerun to resume: {kept:,} of {len(data):,} bytes kept in {part}"
    )
    # Small reads written as they arrive: what came before the stall is on disk.
    assert part.read_bytes() == data[:kept] and not dest.exists()

    server.stall_after = None
    server.requests.clear()
    assert get() == dest
    assert [r for _, r in server.requests] == [f"bytes={kept}-"]
    assert dest.read_bytes() == data and not part.exists()


@pytest.mark.parametrize("failure", [503, 500, 429, 408, "drop", "silent"])
def test_transient_failures_are_retried_with_backoff(server, served_image, tmp_path, caplog, failure):
    url, data = served_image
    server.failures = [failure, failure]
    settings = DownloadSettings(timeout_s=STALL_TIMEOUT_S, retries=2, backoff_s=0.02)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        fetch_image(url, tmp_path / "x.jpg", settings)
    assert time.monotonic() - start >= 0.02 + 0.04  # the backoff doubles
    assert (tmp_path / "x.jpg").read_bytes() == data
    assert len(server.requests) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(url in w for w in warnings)
    assert "(attempt 1 of 3); retrying in 0.02 s" in warnings[0]
    assert "(attempt 2 of 3); retrying in 0.04 s" in warnings[1]
    if isinstance(failure, int):
        assert f"{url} answered HTTP {failure} " in warnings[0]


def test_retries_are_bounded_and_reported(server, served_image, tmp_path):
    url, _ = served_image
    server.failures = [503] * 5
    settings = DownloadSettings(timeout_s=2.0, retries=2, backoff_s=0.01)
    with pytest.raises(HTTPStatusError) as error:
        fetch_image(url, tmp_path / "x.jpg", settings)
    assert str(error.value) == (
        f"{url} answered HTTP 503 Service Unavailable; gave up after 3 attempts; rerun to try again"
    )
    assert error.value.status == 503 and error.value.url == url
    assert len(server.requests) == 3
    assert _leftovers(tmp_path / "x.jpg") == []


@pytest.mark.parametrize("status", [404, 403])
def test_client_errors_fail_at_once(server, tmp_path, status):
    url = f"{server.url}/train2017/missing.jpg"
    if status == 403:
        server.failures = [403]
    settings = DownloadSettings(timeout_s=2.0, retries=1, backoff_s=3.0)  # a retry would show in the time
    start = time.monotonic()
    with pytest.raises(HTTPStatusError) as error:
        fetch_image(url, tmp_path / "missing.jpg", settings)
    assert time.monotonic() - start < 2
    reason = {404: "Not Found", 403: "Forbidden"}[status]
    assert str(error.value) == (
        f"{url} answered HTTP {status} {reason}; not retried; check base_url and that the server holds this file"
    )
    assert len(server.requests) == 1
    assert _leftovers(tmp_path / "missing.jpg") == []


def test_cut_image_then_server_ignoring_range_restarts_cleanly(server, served_image, tmp_path):
    url, data = served_image
    dest = tmp_path / "x.jpg"
    server.cut_after = 3_000
    with pytest.raises(DownloadError, match="rerun to resume: 3,000 of"):
        fetch_image(url, dest, ONCE)
    server.cut_after, server.honor_range = None, False
    server.requests.clear()
    fetch_image(url, dest, ONCE)
    assert server.requests == [("/train2017/x.jpg", "bytes=3000-")]  # asked for the rest, got a 200
    assert dest.read_bytes() == data and _leftovers(dest) == ["x.jpg"]


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "no-content-length"])
def test_truncated_copy_on_the_server_is_rejected(server, served_image, tmp_path, send_length):
    url, data = served_image
    (server.root / "train2017/x.jpg").write_bytes(data[:-1])  # even one byte short
    server.send_length = send_length
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    settings = DownloadSettings(timeout_s=2.0, retries=1, backoff_s=0.0)  # room to ask for the rest once
    with pytest.raises(InvalidImageError) as error:
        fetch_image(url, tmp_path / "x.jpg", settings)
    part = tmp_path / "x.jpg.part"
    assert str(error.value).startswith(f"image downloaded from {url} does not decode fully (image file is truncated")
    assert str(error.value).endswith(f"; removed {part}: rerun to download it again, "
                                     "and check the server's copy if this repeats")
    assert _leftovers(tmp_path / "x.jpg") == []
    # Without a length the rest was asked for once; the server's 416 said there is none.
    expected = [None] if send_length else [None, f"bytes={len(data) - 1}-"]
    assert [r for _, r in server.requests] == expected


def test_existing_image_that_does_not_decode_is_fetched_again(server, served_image, tmp_path, caplog):
    url, data = served_image
    dest = tmp_path / "x.jpg"
    dest.write_bytes(data[: len(data) // 2])  # what an interrupted run used to leave as complete
    with caplog.at_level(logging.WARNING):
        fetch_image(url, dest, ONCE)
    assert f"{dest} does not decode fully (image file is truncated" in caplog.text
    assert "; downloading it again" in caplog.text
    assert dest.read_bytes() == data and server.requests == [("/train2017/x.jpg", None)]
    server.requests.clear()
    fetch_image(url, dest, ONCE)  # whole now: no request
    assert server.requests == []


def test_mirror_url_and_subset():
    url = "http://images.cocodataset.org/train2017/000000391895.jpg"
    mirrored = mirror_url(url, "http://127.0.0.1:8000/")
    assert mirrored == "http://127.0.0.1:8000/train2017/000000391895.jpg"
    train = _instances("train")
    subset = subset_annotations(train, [105, 102])
    assert [im["id"] for im in subset["images"]] == [105, 102]
    assert {a["image_id"] for a in subset["annotations"]} == {102, 105}
    assert subset["categories"] == train["categories"] and subset["info"] == train["info"]


def test_choose_images_only_annotated_and_too_many():
    train = _instances("train")
    assert set(choose_images(train, 8, seed=3)) == ANNOTATED_TRAIN_IDS
    first = choose_images(train, 3, seed=3)
    assert first == sorted(first) == choose_images(train, 3, seed=3)
    rest = choose_images(train, 5, seed=4, exclude=set(first))
    assert not set(first) & set(rest)
    with pytest.raises(ValueError, match=r"asked for 9 images but only 8"):
        choose_images(train, 9, seed=0)
    with pytest.raises(ValueError, match=r"asked for 6 images but only 5"):
        choose_images(train, 6, seed=0, exclude=set(first))


# --- a tiny fake COCO -------------------------------------------------------------------


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (seed * 37 % 256, 80, 160)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _instances(split: str) -> dict:
    """Return a small COCO-format annotation dict for `split` ('val' or 'train')."""
    ids = list(range(1, 7)) if split == "val" else list(range(101, 111))
    images = [
        {
            "id": i,
            "file_name": f"{i:012d}.jpg",
            "width": 32,
            "height": 24,
            "coco_url": f"http://images.cocodataset.org/{split}2017/{i:012d}.jpg",
        }
        for i in ids
    ]
    annotations = []
    for i in ids[:-2]:  # the last two: one crowd-only (below), one without annotations
        for k in range(2):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i, "category_id": 1 + k,
                 "bbox": [2.0, 3.0, 10.0, 8.0], "area": 80.0, "iscrowd": 0}
            )
    annotations.append(
        {"id": len(annotations) + 1, "image_id": ids[-2], "category_id": 1,
         "bbox": [0.0, 0.0, 32.0, 24.0], "area": 768.0, "iscrowd": 1,
         "segmentation": {"counts": [0, 768], "size": [24, 32]}}
    )
    return {
        "info": {"description": "fake COCO for tests"},
        "licenses": [],
        "categories": [{"id": 1, "name": "cat", "supercategory": "animal"},
                       {"id": 2, "name": "dog", "supercategory": "animal"}],
        "images": images,
        "annotations": annotations,
    }


def _serve_fake_coco(root: Path) -> dict[str, Archive]:
    """Lay out the fake COCO archives and train images under `root` as the mirror does."""
    (root / "annotations").mkdir(parents=True)
    (root / "zips").mkdir()
    (root / "train2017").mkdir()
    with zipfile.ZipFile(root / "annotations/annotations_trainval2017.zip", "w") as z:
        z.writestr("annotations/instances_val2017.json", json.dumps(_instances("val")))
        z.writestr("annotations/instances_train2017.json", json.dumps(_instances("train")))
        z.writestr("annotations/captions_val2017.json", "{}")
    with zipfile.ZipFile(root / "zips/val2017.zip", "w") as z:
        for im in _instances("val")["images"]:
            z.writestr(f"val2017/{im['file_name']}", _jpeg(im["id"]))
    for im in _instances("train")["images"]:
        (root / "train2017" / im["file_name"]).write_bytes(_jpeg(im["id"]))
    archives = {}
    for name, rel in (("annotations_trainval2017.zip", "annotations/annotations_trainval2017.zip"),
                      ("val2017.zip", "zips/val2017.zip")):
        data = (root / rel).read_bytes()
        archives[name] = Archive(rel, len(data), _md5(data))
    return archives


def _local_root(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    for split in ("val", "train"):
        instances = _instances(split)
        (root / f"annotations/instances_{split}2017.json").write_text(json.dumps(instances))
        (root / f"{split}2017").mkdir()
        for im in instances["images"]:
            (root / f"{split}2017" / im["file_name"]).write_bytes(_jpeg(im["id"]))
    return root


def _check_output(out: Path, splits: dict, val_count: int) -> dict[str, list[int]]:
    """Check the manifest's entries and the files they name; return the image ids of each split."""
    from pycocotools.coco import COCO

    ids = {}
    for name, split in splits.items():
        assert split["annotations"] == f"instances_{name}.json"
        images = Path(split["images"])
        assert images.is_absolute()
        coco = COCO(str(out / split["annotations"]))
        ids[name] = sorted(coco.getImgIds())
        for im in coco.loadImgs(ids[name]):
            assert (images / im["file_name"]).is_file()
    assert len(ids["val"]) == val_count
    assert len(ids["train"]) == 3 and len(ids["calibration"]) == 2
    assert not set(ids["train"]) & set(ids["calibration"])
    assert set(ids["train"]) | set(ids["calibration"]) <= ANNOTATED_TRAIN_IDS
    return ids


def test_prepare_coco_downloads_from_mirror(server, tmp_path):
    archives = _serve_fake_coco(server.root)
    cache = tmp_path / "cache"
    kwargs = dict(root=None, base_url=server.url, download_dir=cache, val_images=2,
                  train_images=3, calibration_images=2, seed=0, archives=archives,
                  download=asdict(ONCE))

    splits = prepare_coco(out_dir=tmp_path / "out", **kwargs)
    ids = _check_output(tmp_path / "out", splits, val_count=2)
    assert Path(splits["val"]["images"]) == (cache / "val2017").resolve()
    assert Path(splits["train"]["images"]) == (cache / "train2017").resolve()
    assert set(ids["val"]) <= {1, 2, 3, 4}
    # Train images came from the local mirror, one request each, not from cocodataset.org.
    fetched = sorted(p for p, _ in server.requests if p.startswith("/train2017/"))
    assert fetched == sorted(f"/train2017/{i:012d}.jpg" for i in ids["train"] + ids["calibration"])
    on_disk = sorted(p.name for p in (cache / "train2017").iterdir())
    assert on_disk == [p.rsplit("/", 1)[1] for p in fetched]
    assert not list(cache.rglob("*.part"))

    # Everything is cached: the same call again makes no request and gives the same files.
    server.requests.clear()
    again = prepare_coco(out_dir=tmp_path / "again", **kwargs)
    assert server.requests == []
    assert again == splits
    for name in ("instances_val", "instances_train", "instances_calibration"):
        file = f"{name}.json"
        assert (tmp_path / "again" / file).read_bytes() == (tmp_path / "out" / file).read_bytes()

    # val_images=0: the whole val annotation file, still without any request.
    full = prepare_coco(out_dir=tmp_path / "full", **{**kwargs, "val_images": 0})
    assert server.requests == []
    assert _check_output(tmp_path / "full", full, val_count=6)["val"] == list(range(1, 7))

    # A cached image one byte short (as an older run could leave it) is fetched again, not taken as done.
    cut = cache / "train2017" / on_disk[0]
    cut.write_bytes(cut.read_bytes()[:-1])
    prepare_coco(out_dir=tmp_path / "recut", **kwargs)
    assert server.requests == [(f"/train2017/{on_disk[0]}", None)]
    assert cut.read_bytes() == (server.root / "train2017" / on_disk[0]).read_bytes()


def test_prepare_coco_from_local_root(tmp_path):
    root = _local_root(tmp_path / "coco")
    cache = tmp_path / "unused-cache"
    kwargs = dict(root=root, base_url="http://127.0.0.1:9", download_dir=cache, val_images=3,
                  train_images=3, calibration_images=2, seed=7, download=asdict(ONCE))
    splits = prepare_coco(out_dir=tmp_path / "out", **kwargs)
    _check_output(tmp_path / "out", splits, val_count=3)
    assert Path(splits["val"]["images"]) == (root / "val2017").resolve()
    assert Path(splits["calibration"]["images"]) == (root / "train2017").resolve()
    assert not cache.exists()

    for path in (root / "val2017").iterdir():
        path.unlink()
    (root / "val2017").rmdir()
    with pytest.raises(FileNotFoundError, match=r"lacks val2017/ .*a COCO root needs at least"):
        prepare_coco(out_dir=tmp_path / "missing", **kwargs)


def test_data_stage_of_the_coco_study_uses_a_local_root(tmp_path, monkeypatch):
    """The `data` command with `study: coco` and a local root: the real stage, settings from params.yaml."""

    import yaml

    from detr_sparsity.cli import main

    repo = Path(__file__).resolve().parents[1]
    root = _local_root(tmp_path / "coco")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["study"] = "coco"
    params["studies"]["coco"]["data"].update(root=str(root), val_images=3, train_images=3, calibration_images=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "workflow/schemas").mkdir(parents=True)
    shutil.copy(repo / "workflow/schemas/params.schema.yaml", tmp_path / "workflow/schemas")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    assert main(["--params", "params.yaml", "data", "--out", "results/coco/data"]) == 0
    out = tmp_path / "results/coco/data"
    splits = json.loads((out / "splits.json").read_text())
    counts = {name: len(json.loads((out / s["annotations"]).read_text())["images"]) for name, s in splits.items()}
    assert counts == {"val": 3, "train": 3, "calibration": 2}
    assert Path(splits["train"]["images"]) == (root / "train2017").resolve()
    # Every image was decoded where it entered, and its digest recorded (the root is read in place).
    for name, split in splits.items():
        images = json.loads((out / split["annotations"]).read_text())["images"]
        assert split["images_sha256"] == {im["file_name"]: hashlib.sha256(
            (Path(split["images"]) / im["file_name"]).read_bytes()).hexdigest() for im in images}
    # Nothing but the finished output is left behind (the stage writes into a temporary directory first).
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]


# --- a val-only root (annotations/instances_val2017.json and val2017/, no train2017) ------------------------


def _val_only_root(root: Path, keep_train_annotations: bool = False) -> Path:
    _local_root(root)
    shutil.rmtree(root / "train2017")
    if not keep_train_annotations:
        (root / "annotations/instances_train2017.json").unlink()
    return root


def test_val_only_root_with_held_out_val_images_needs_nothing_else(tmp_path):
    root = _val_only_root(tmp_path / "coco")
    cache = tmp_path / "unused-cache"
    splits = prepare_coco(out_dir=tmp_path / "out", root=root, base_url="http://127.0.0.1:9", download_dir=cache,
                          val_images=0, train_images=2, calibration_images=1, held_out_from_val=4, seed=0,
                          download=asdict(ONCE))
    ids = {name: [im["id"] for im in json.loads((tmp_path / "out" / s["annotations"]).read_text())["images"]]
           for name, s in splits.items()}
    # The four annotated val2017 images are held out: train and calibration come from them, val is the rest.
    assert sorted(ids["train"] + ids["calibration"]) != [] and len(ids["train"]) == 2 and len(ids["calibration"]) == 1
    assert set(ids["train"] + ids["calibration"]) <= {1, 2, 3, 4} and not set(ids["train"]) & set(ids["calibration"])
    assert ids["val"] == [5, 6]
    assert {Path(s["images"]) for s in splits.values()} == {(root / "val2017").resolve()}
    assert splits["val"]["note"] == ("2 of the 6 val2017 images (4 are held out for the train and calibration splits); "
                                     "published val2017 results, such as the 42.0 AP of DETR-R50, are measured on "
                                     "all 6")
    assert "note" not in splits["train"] and not cache.exists()


@pytest.mark.parametrize("train_annotations", ["downloaded", "in the root"])
def test_val_only_root_fetches_train_images_and_evaluates_val_in_place(server, tmp_path, train_annotations):
    archives = _serve_fake_coco(server.root)
    root = _val_only_root(tmp_path / "coco", keep_train_annotations=train_annotations == "in the root")
    cache = tmp_path / "cache"
    splits = prepare_coco(out_dir=tmp_path / "out", root=root, base_url=server.url, download_dir=cache, val_images=0,
                          train_images=3, calibration_images=2, seed=0, archives=archives, download=asdict(ONCE))
    ids = _check_output(tmp_path / "out", splits, val_count=6)
    assert Path(splits["val"]["images"]) == (root / "val2017").resolve() and "note" not in splits["val"]
    assert Path(splits["train"]["images"]) == Path(splits["calibration"]["images"]) == (cache / "train2017").resolve()
    fetched = sorted(p for p, _ in server.requests if p.startswith("/train2017/"))
    assert fetched == sorted(f"/train2017/{i:012d}.jpg" for i in ids["train"] + ids["calibration"])
    archive_requests = [p for p, _ in server.requests if not p.startswith("/train2017/")]
    if train_annotations == "downloaded":  # only the annotations archive, and only the train file taken from it
        assert archive_requests == ["/annotations/annotations_trainval2017.zip"]
        assert sorted(str(p.relative_to(cache)) for p in (cache / "annotations").iterdir()) == [
            "annotations/instances_train2017.json"]
    else:
        assert archive_requests == [] and not (cache / "annotations").exists()
    assert not (cache / "val2017").exists()


@pytest.mark.parametrize("fault", ["corrupt JSON", "unknown image_id"])
def test_a_bad_annotation_file_in_a_root_is_named(tmp_path, fault):
    root = _local_root(tmp_path / "coco")
    path = root / "annotations/instances_val2017.json"
    if fault == "corrupt JSON":
        path.write_bytes(path.read_bytes()[:300])
    else:
        instances = json.loads(path.read_text())
        instances["annotations"][2]["image_id"] = 999999
        path.write_text(json.dumps(instances))
    with pytest.raises(DataError) as error:
        prepare_coco(out_dir=tmp_path / "out", root=root, base_url="http://127.0.0.1:9", download_dir=tmp_path / "c",
                     val_images=0, train_images=3, calibration_images=2, seed=0, download=asdict(ONCE))
    if fault == "corrupt JSON":
        assert str(error.value).startswith(f"{path} is not valid JSON (a COCO instances file): ")
    else:
        assert str(error.value) == (f"{path}: annotation 3 has image_id 999999, which is not an image of the file "
                                    "(6 images, ids 1, 2, 3, 4, 5, 6)")
