"""Acquire real COCO 2017 data: verified, resumable downloads and seeded image subsets."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import sys
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image, ImageFile
from tqdm import tqdm

from detr_sparsity.atomic import atomic_path, write_json
from detr_sparsity.data.dataset import read_instances
from detr_sparsity.data.download import DownloadSettings, download_part

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://images.cocodataset.org"


@dataclass(frozen=True)
class Archive:
    """A COCO archive: its URL path under the base URL, its size in bytes and its md5."""

    path: str
    size: int
    md5: str


ANNOTATIONS_ARCHIVE = "annotations_trainval2017.zip"
VAL_ARCHIVE = "val2017.zip"

ARCHIVES: dict[str, Archive] = {
    ANNOTATIONS_ARCHIVE: Archive(
        "annotations/annotations_trainval2017.zip", 252_907_541, "f4bbac642086de4f52a3fdda2de5fa2c"
    ),
    VAL_ARCHIVE: Archive("zips/val2017.zip", 815_585_330, "442b8da7639aecaf257c1dceb8ba8c80"),
}

# Recorded for reference only: the study needs a few thousand train images, so they are
# fetched one by one instead of downloading this 19 GB archive.
TRAIN_ARCHIVE = Archive("zips/train2017.zip", 19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2")

ROOT_LAYOUT = (
    "annotations/instances_val2017.json",
    "annotations/instances_train2017.json",
    "val2017",
    "train2017",
)


class ChecksumError(RuntimeError):
    """A downloaded file does not have the expected size or md5."""


class InvalidImageError(RuntimeError):
    """A downloaded image does not decode fully."""


def _md5(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex md5 of a file, read in chunks so large archives need little memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(path: Path, size: int | None, md5: str | None) -> tuple[str, str, str] | None:
    """Return (what, expected, actual) for the first failed check of `path`, or None."""
    actual_size = path.stat().st_size
    # The size check comes first: it is free and catches most truncated files.
    if size is not None and actual_size != size:
        return "size", f"{size} bytes", f"{actual_size} bytes"
    if md5 is not None:
        actual_md5 = _md5(path)
        if actual_md5 != md5.lower():
            return "md5", md5.lower(), actual_md5
    return None


def download_file(
    url: str, dest: Path, *, size: int | None, md5: str | None, settings: DownloadSettings
) -> Path:
    """Download `url` to `dest`, resuming a partial download and verifying size and md5."""
    dest = Path(dest)
    if dest.exists():
        if _mismatch(dest, size, md5) is None:
            log.info("%s already verified", dest)
            return dest
        log.warning("%s exists but does not match its checksum; downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is None or have < size:
        resuming = f" (resuming at {have:,} bytes)" if have else ""
        log.info("downloading %s to %s%s", url, dest, resuming)
        # Failures keep what arrived in `part` and say so; a short file is never checksummed.
        download_part(url, part, settings, size=size)
    mismatch = _mismatch(part, size, md5)
    if mismatch is not None:
        what, expected, actual = mismatch
        part.unlink()
        raise ChecksumError(
            f"{what} mismatch for {url}: expected {expected}, got {actual} "
            f"(the corrupt download {part} was removed; rerun to download again)"
        )
    os.replace(part, dest)
    log.info("verified %s", dest)
    return dest


def _image_problem(path: Path, size: int | None) -> str | None:
    """Say why `path` is not a complete image (wrong size, or it does not decode fully), or None."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by imported code), so a cut image would "
            "decode as complete; leave it False"
        )
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"holds {actual:,} of {size:,} bytes"
    try:
        with Image.open(path) as image:
            # verify() passes a JPEG cut short; load() decodes every byte and fails on a truncated one.
            image.load()
    except Exception as error:
        return f"does not decode fully ({error})"
    return None


def fetch_image(url: str, dest: Path, settings: DownloadSettings) -> Path:
    """Download one image to `dest` unless a complete copy is there, resuming a partial download."""
    dest = Path(dest)
    if dest.exists():
        problem = _image_problem(dest, None)
        if problem is None:
            return dest
        # Images are small: a bad one (an older run may have saved a cut one) is simply fetched again.
        log.warning("%s %s; downloading it again", dest, problem)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # Without a Content-Length only decoding tells a cut image; then the rest is asked for.
    total = download_part(url, part, settings, incomplete=lambda path: _image_problem(path, None))
    problem = _image_problem(part, total)
    if problem is not None:
        part.unlink()
        raise InvalidImageError(
            f"image downloaded from {url} {problem}; removed {part}: rerun to download it again, "
            "and check the server's copy if this repeats"
        )
    os.replace(part, dest)
    return dest


def mirror_url(coco_url: str, base_url: str) -> str:
    """Rewrite an annotation's `coco_url` to the same path under `base_url`."""
    return base_url.rstrip("/") + urllib.parse.urlsplit(coco_url).path


def subset_annotations(instances: dict, image_ids: list[int]) -> dict:
    """Return a COCO-format dict restricted to `image_ids`, images in that order."""
    by_id = {image["id"]: image for image in instances["images"]}
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        raise KeyError(f"image ids not in the annotation file: {missing[:10]}")
    wanted = set(image_ids)
    subset = {k: v for k, v in instances.items() if k not in ("images", "annotations")}
    subset["images"] = [by_id[i] for i in image_ids]
    subset["annotations"] = [a for a in instances["annotations"] if a["image_id"] in wanted]
    return subset


def choose_images(
    instances: dict, count: int, seed: int, exclude: Iterable[int] = frozenset()
) -> list[int]:
    """Choose `count` seeded image ids with a non-crowd annotation, outside `exclude`; sorted."""
    annotated = {a["image_id"] for a in instances["annotations"] if not a.get("iscrowd", 0)}
    excluded = set(exclude)
    # Sorting the candidates makes the choice depend only on the seed, not on file order.
    candidates = sorted(
        image["id"]
        for image in instances["images"]
        if image["id"] in annotated and image["id"] not in excluded
    )
    if count > len(candidates):
        raise ValueError(
            f"asked for {count} images but only {len(candidates)} images with a non-crowd "
            "annotation are available"
        )
    return sorted(random.Random(seed).sample(candidates, count))


def _load_json(path: Path) -> Any:
    """Read a COCO instances file, checked where it enters: errors name the file (and the annotation)."""
    log.info("reading %s", path)
    return read_instances(path)


def _check_root(root: Path) -> None:
    """Raise FileNotFoundError if `root` lacks part of the COCO 2017 layout."""
    for relative in ROOT_LAYOUT:
        if not (root / relative).exists():
            raise FileNotFoundError(
                f"{root / relative} not found: a COCO root must contain "
                + ", ".join(ROOT_LAYOUT)
            )


def _check_images_present(images: list[dict], image_dir: Path) -> None:
    """Raise FileNotFoundError if some chosen images are missing from a local root."""
    missing = [im["file_name"] for im in images if not (image_dir / im["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} chosen images are missing from {image_dir}, e.g. {missing[:5]}"
        )


def _extract(zip_path: Path, members: list[str] | None, target: Path, md5: str) -> None:
    """Extract `members` (or all) of `zip_path` into `target` once per archive md5."""
    # The marker is written last, so an interrupted extraction is redone in full.
    marker = target / f".{zip_path.name}.extracted"
    if marker.exists() and marker.read_text().strip() == md5:
        log.info("%s already extracted", zip_path)
        return
    log.info("extracting %s into %s", zip_path, target)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(target, members=members)
    with atomic_path(marker) as tmp:
        tmp.write_text(md5 + "\n")


def _download_archives(
    base_url: str, download_dir: Path, archives: dict[str, Archive], settings: DownloadSettings
) -> None:
    """Download and extract the annotation and val2017 archives into `download_dir`."""
    base = base_url.rstrip("/")
    for name in (ANNOTATIONS_ARCHIVE, VAL_ARCHIVE):
        archive = archives[name]
        zip_path = download_file(
            f"{base}/{archive.path}",
            download_dir / name,
            size=archive.size,
            md5=archive.md5,
            settings=settings,
        )
        if name == ANNOTATIONS_ARCHIVE:
            members = ["annotations/instances_val2017.json", "annotations/instances_train2017.json"]
        else:
            with zipfile.ZipFile(zip_path) as z:
                members = [m for m in z.namelist() if m.startswith("val2017/")]
        _extract(zip_path, members, download_dir, archive.md5)


def _fetch_images(
    images: list[dict], base_url: str, image_dir: Path, settings: DownloadSettings
) -> None:
    """Fetch each image from the mirror into `image_dir`, keeping those already there and whole."""
    present = sum((image_dir / im["file_name"]).exists() for im in images)
    log.info(
        "fetching %d of %d images into %s (%d already present, each checked to decode fully)",
        len(images) - present, len(images), image_dir, present,
    )
    for image in tqdm(images, desc="images", unit="img", disable=not sys.stderr.isatty()):
        url = mirror_url(image["coco_url"], base_url)
        fetch_image(url, image_dir / image["file_name"], settings)


def _split_path(path: Path, out_dir: Path) -> str:
    """Return `path` relative to `out_dir` if inside it (it gets renamed), else absolute."""
    path, out_dir = path.resolve(), out_dir.resolve()
    if path.is_relative_to(out_dir):
        return os.path.relpath(path, out_dir)
    return str(path)


def prepare_coco(
    *,
    out_dir: Path,
    root: Path | None,
    base_url: str,
    download_dir: Path,
    val_images: int,
    train_images: int,
    calibration_images: int,
    seed: int,
    download: Mapping[str, Any],
    archives: dict[str, Archive] | None = None,
) -> dict:
    """Write the val, train and calibration annotation files into `out_dir`; return the manifest's entries.

    `download` is the study's `data.download` block: timeout_s, retries and backoff_s.
    """
    settings = DownloadSettings(**download)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if root is not None:
        root = Path(root)
        _check_root(root)
        log.info("using the local COCO root %s as is", root)
        source = root
    else:
        source = Path(download_dir)
        _download_archives(base_url, source, archives or ARCHIVES, settings)
    val_json = source / "annotations/instances_val2017.json"
    train_json = source / "annotations/instances_train2017.json"
    val_dir, train_dir = source / "val2017", source / "train2017"

    val_out = out_dir / "instances_val.json"
    if val_images == 0:
        log.info("val split: all val2017 images")
        with atomic_path(val_out) as tmp:
            shutil.copyfile(val_json, tmp)
        if root is not None:
            _check_images_present(_load_json(val_json)["images"], val_dir)
    else:
        val = _load_json(val_json)
        val_subset = subset_annotations(val, choose_images(val, val_images, seed))
        log.info("val split: %d of %d val2017 images", val_images, len(val["images"]))
        if root is not None:
            _check_images_present(val_subset["images"], val_dir)
        write_json(val_out, val_subset)

    train = _load_json(train_json)
    train_ids = choose_images(train, train_images, seed)
    # A different seed and the exclusion keep calibration images out of the train split.
    calibration_ids = choose_images(train, calibration_images, seed + 1, exclude=set(train_ids))
    for name, ids in (("train", train_ids), ("calibration", calibration_ids)):
        subset = subset_annotations(train, ids)
        log.info("%s split: %d train2017 images", name, len(ids))
        if root is None:
            _fetch_images(subset["images"], base_url, train_dir, settings)
        else:
            _check_images_present(subset["images"], train_dir)
        write_json(out_dir / f"instances_{name}.json", subset)

    return {
        name: {"annotations": f"instances_{name}.json", "images": _split_path(image_dir, out_dir)}
        for name, image_dir in (("val", val_dir), ("train", train_dir), ("calibration", train_dir))
    }
