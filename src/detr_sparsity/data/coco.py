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
from detr_sparsity.data.coco_root import (TRAIN_ANNOTATIONS, TRAIN_IMAGES, VAL_ANNOTATIONS, VAL_IMAGES,
                                          root_layout)
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


def _check_images_present(images: list[dict], image_dir: Path) -> None:
    """Raise FileNotFoundError if some chosen images are missing from a local root."""
    missing = [im["file_name"] for im in images if not (image_dir / im["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} chosen images are missing from {image_dir}, e.g. {missing[:5]}"
        )


def _extract(zip_path: Path, members: list[str], target: Path, md5: str) -> None:
    """Extract `members` of `zip_path` into `target` once per archive md5."""
    # The marker is written last, so an interrupted extraction is redone in full; a later call may want members
    # an earlier one left out (the train annotations alone, for a val-only root).
    marker = target / f".{zip_path.name}.extracted"
    if (marker.exists() and marker.read_text().strip() == md5
            and all((target / member).exists() for member in members)):
        log.info("%s already extracted", zip_path)
        return
    log.info("extracting %s into %s", zip_path, target)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(target, members=members)
    with atomic_path(marker) as tmp:
        tmp.write_text(md5 + "\n")


def _download_archive(
    name: str, members: list[str] | None, base_url: str, download_dir: Path, archives: dict[str, Archive],
    settings: DownloadSettings,
) -> None:
    """Download one archive into `download_dir` and extract `members` of it (None: the val2017 images)."""
    archive = archives[name]
    zip_path = download_file(
        f"{base_url.rstrip('/')}/{archive.path}",
        download_dir / name,
        size=archive.size,
        md5=archive.md5,
        settings=settings,
    )
    if members is None:
        with zipfile.ZipFile(zip_path) as z:
            members = [m for m in z.namelist() if m.startswith(VAL_IMAGES + "/")]
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


def _evaluation_note(evaluated: int, total: int, held_out: int) -> str | None:
    """What the val split covers when it is not the whole of val2017, for the rows and T1; None when it is."""
    if evaluated == total:
        return None
    why = (f"{held_out:,} are held out for the train and calibration splits" if held_out else "a seeded subset")
    return (f"{evaluated:,} of the {total:,} val2017 images ({why}); published val2017 results, such as the "
            f"42.0 AP of DETR-R50, are measured on all {total:,}")


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
    held_out_from_val: int = 0,
    archives: dict[str, Archive] | None = None,
) -> dict:
    """Write the val, train and calibration annotation files into `out_dir`; return the manifest's entries.

    val2017 is evaluated (in place under a local root). The train and calibration images come from train2017: a
    local root's, or fetched one by one from `base_url` (a val-only root: with the train annotations downloaded
    too), or, with `held_out_from_val` = N > 0, from N val2017 images held out of the evaluation.
    `download` is the study's `data.download` block: timeout_s, retries and backoff_s.
    """
    settings = DownloadSettings(**download)
    archives = archives or ARCHIVES
    out_dir, download_dir = Path(out_dir), Path(download_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if root is not None:
        layout = root_layout(root)
        if layout.problem():
            raise FileNotFoundError(layout.problem())
        log.info("%s", layout.describe(held_out_from_val))
        source = layout.root
        local_train = layout.train_annotations and layout.train_images
        if not (held_out_from_val or local_train or layout.train_annotations):
            _download_archive(ANNOTATIONS_ARCHIVE, [TRAIN_ANNOTATIONS], base_url, download_dir, archives, settings)
        train_json = (source if layout.train_annotations else download_dir) / TRAIN_ANNOTATIONS
        train_dir = (source if local_train else download_dir) / TRAIN_IMAGES
    else:
        source = download_dir
        _download_archive(ANNOTATIONS_ARCHIVE, [VAL_ANNOTATIONS, TRAIN_ANNOTATIONS], base_url, download_dir,
                          archives, settings)
        _download_archive(VAL_ARCHIVE, None, base_url, download_dir, archives, settings)
        local_train = False
        train_json, train_dir = download_dir / TRAIN_ANNOTATIONS, download_dir / TRAIN_IMAGES
    val_json, val_dir = source / VAL_ANNOTATIONS, source / VAL_IMAGES

    val = _load_json(val_json)
    # Held-out images are drawn with their own seed; the evaluation split is then chosen from the rest.
    held_out = choose_images(val, held_out_from_val, seed + 2) if held_out_from_val else []
    val_out = out_dir / "instances_val.json"
    if not held_out and val_images == 0:
        log.info("val split: all val2017 images")
        with atomic_path(val_out) as tmp:
            shutil.copyfile(val_json, tmp)
        val_subset = val
    else:
        excluded = set(held_out)
        val_ids = ([im["id"] for im in val["images"] if im["id"] not in excluded] if val_images == 0
                   else choose_images(val, val_images, seed, exclude=excluded))
        val_subset = subset_annotations(val, val_ids)
        write_json(val_out, val_subset)
    evaluated = len(val_subset["images"])
    log.info("val split: %d of %d val2017 images%s", evaluated, len(val["images"]),
             f" ({len(held_out)} held out for train and calibration)" if held_out else "")
    if root is not None:
        _check_images_present(val_subset["images"], val_dir)

    if held_out:
        pool, image_dir = subset_annotations(val, held_out), val_dir
    else:
        pool, image_dir = _load_json(train_json), train_dir
    train_ids = choose_images(pool, train_images, seed)
    # A different seed and the exclusion keep calibration images out of the train split.
    calibration_ids = choose_images(pool, calibration_images, seed + 1, exclude=set(train_ids))
    for name, ids in (("train", train_ids), ("calibration", calibration_ids)):
        subset = subset_annotations(pool, ids)
        log.info("%s split: %d %s images", name, len(ids), "held-out val2017" if held_out else "train2017")
        if held_out or local_train:
            _check_images_present(subset["images"], image_dir)
        else:
            _fetch_images(subset["images"], base_url, image_dir, settings)
        write_json(out_dir / f"instances_{name}.json", subset)

    note = _evaluation_note(evaluated, len(val["images"]), len(held_out))
    return {
        name: {
            "annotations": f"instances_{name}.json",
            "images": _split_path(images, out_dir),
            **({"note": note} if name == "val" and note else {}),
        }
        for name, images in (("val", val_dir), ("train", image_dir), ("calibration", image_dir))
    }
