"""COCO-format detection dataset and the collate function that turns it into DETR inputs.

The same code serves the synthetic study and COCO: a split is an `instances_*.json` plus an image
directory, as listed in the data stage's manifest (`splits.json`). Inputs are checked where they enter and
where they are read: the data stage decodes every image fully, checks every annotation and records each image's
sha256 in the manifest (`verify_split`); reading an image checks it against that digest (`read_image`), so an
image that changed after the data stage (a COCO root is read in place) fails naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import DetrImageProcessorPil

from detr_sparsity.config import InputSize

log = logging.getLogger(__name__)

MANIFEST = "splits.json"
DIGESTS = "images_sha256"  # the manifest's record of each image of a split: file name -> sha256 of its bytes


class DataError(ValueError):
    """An input file (annotations, an image, the manifest) is not what the study can use; the message names it."""


@dataclass(frozen=True)
class Split:
    """One split on disk: its COCO annotation file, its image directory and the digest of each image."""

    name: str
    annotations: Path
    images: Path
    digests: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    manifest: Path | None = None  # where the digests are recorded
    note: str | None = None  # what the split covers, where that is less than its source (a part of val2017)


def _read_json(path: Path, what: str) -> Any:
    """A JSON file, or a DataError naming it and saying what is wrong."""
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path} not found ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({what}): {err}") from None


def load_split(data_dir: str | Path, split: str) -> Split:
    """Find a split in the data stage's output via its manifest."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    manifest = _read_json(manifest_path, "the data stage's manifest")
    if split not in manifest:
        raise KeyError(f"split {split!r} not in {manifest_path}; available: {', '.join(manifest)}")
    entry = manifest[split]
    if DIGESTS not in entry:
        raise DataError(f"{manifest_path} records no image digests for split {split!r} (written by an older data "
                        "stage); rerun the data stage")
    # Relative entries are relative to the data directory; absolute ones point at a local COCO root.
    return Split(split, data_dir / entry["annotations"], data_dir / entry["images"], entry[DIGESTS], manifest_path,
                 entry.get("note"))


def _ids(records: list, kind: str, path: Path) -> set:
    """The ids of a list of records (images, categories, annotations): present and unique, or a DataError."""
    ids: set = set()
    for position, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"{path}: entry {position} of {kind!r} has no id")
        if record["id"] in ids:
            raise DataError(f"{path}: {kind} id {record['id']} occurs more than once")
        ids.add(record["id"])
    return ids


def _listed(ids: set) -> str:
    shown = sorted(ids, key=str)
    return ", ".join(map(str, shown[:10])) + (f", ... ({len(shown)} in all)" if len(shown) > 10 else "")


def check_instances(instances: Any, path: Path) -> None:
    """A COCO instances file as the study reads it: lists of images (id, file_name), categories and annotations,
    each annotation's image_id one of the file's images and its category_id one of its categories, its bbox four
    numbers. Raises a DataError naming the file, the annotation id and the value."""
    if not isinstance(instances, dict):
        raise DataError(f"{path} is not a COCO instances file: it holds a {type(instances).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances.get(key), list):
            raise DataError(f"{path} is not a COCO instances file: {key!r} is missing or not a list")
    image_ids = _ids(instances["images"], "images", path)
    category_ids = _ids(instances["categories"], "categories", path)
    _ids(instances["annotations"], "annotations", path)
    for image in instances["images"]:
        if not isinstance(image.get("file_name"), str):
            raise DataError(f"{path}: image {image['id']} has no file_name")
    unknown_images = [a for a in instances["annotations"] if a.get("image_id") not in image_ids]
    if unknown_images:
        first = unknown_images[0]
        raise DataError(f"{path}: annotation {first['id']} has image_id {first.get('image_id')!r}, which is not an "
                        f"image of the file ({len(image_ids)} images, ids {_listed(image_ids)})"
                        + (f"; {len(unknown_images) - 1} more annotations too" if len(unknown_images) > 1 else ""))
    unknown_categories = [a for a in instances["annotations"] if a.get("category_id") not in category_ids]
    if unknown_categories:
        first = unknown_categories[0]
        raise DataError(f"{path}: annotation {first['id']} has category_id {first.get('category_id')!r}, which is "
                        f"not a category of the file (categories: {_listed(category_ids) or 'none'})"
                        + (f"; {len(unknown_categories) - 1} more annotations too" if len(unknown_categories) > 1
                           else ""))
    for ann in instances["annotations"]:
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DataError(f"{path}: annotation {ann['id']} has bbox {box!r}; a bbox is [x, y, width, height]")


def read_instances(path: str | Path) -> dict:
    """A COCO instances file, checked (`check_instances`); errors name the file."""
    instances = _read_json(Path(path), "a COCO instances file")
    check_instances(instances, Path(path))
    return instances


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err.strerror or err}") from None


def decode_image(data: bytes, path: Path) -> Image.Image:
    """Decode every byte of an image (`load()`, not `verify()`, which passes a JPEG cut short); a DataError naming
    the file if it does not decode fully."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by imported code), so a cut image would "
                           "decode as complete; leave it False")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:
        raise DataError(f"image {path} does not decode fully: {err}") from None
    return image


def read_image(path: Path, digest: str) -> Image.Image:
    """An image as RGB, after checking its bytes against the sha256 the data stage recorded; the bytes are read once,
    hashed and decoded from memory."""
    data = _image_bytes(path)
    actual = sha256(data)
    if actual != digest:
        raise DataError(f"image {path} changed after the data stage verified it (sha256 {actual[:16]}..., recorded "
                        f"{digest[:16]}...): restore it, or rerun the data stage to verify the new file")
    return decode_image(data, path).convert("RGB")


def verify_split(data_dir: Path, name: str, entry: Mapping[str, str]) -> dict[str, str]:
    """Check one split where it enters the study: its annotation file (`check_instances`) and every image, decoded
    fully. Returns the sha256 of each image, by file name, for the manifest."""
    annotations, image_dir = Path(data_dir) / entry["annotations"], Path(data_dir) / entry["images"]
    instances = read_instances(annotations)
    digests = {}
    for image in tqdm(instances["images"], desc=f"verifying {name}", unit="img", mininterval=5,
                      disable=not sys.stderr.isatty()):
        path = image_dir / image["file_name"]
        data = _image_bytes(path)
        decode_image(data, path).close()
        digests[image["file_name"]] = sha256(data)
    log.info("split %s: %d images decoded fully, %d annotations checked", name, len(digests),
             len(instances["annotations"]))
    return digests


def verify_splits(data_dir: Path, manifest: Mapping[str, Mapping[str, str]]) -> dict[str, dict]:
    """The manifest (splits.json) of `data_dir`'s splits, each checked (`verify_split`) and with its images' digests."""
    return {name: {**entry, DIGESTS: verify_split(data_dir, name, entry)} for name, entry in manifest.items()}


class CocoDetection(Dataset):
    """Images with their COCO annotations, in the order of the annotation file."""

    def __init__(self, split: Split):
        self.split = split
        instances = read_instances(split.annotations)
        self.images = instances["images"]
        self.categories = instances["categories"]
        unrecorded = [im["file_name"] for im in self.images if im["file_name"] not in split.digests]
        if unrecorded:
            raise DataError(f"{split.manifest or 'the manifest'} records no digest for {len(unrecorded)} image(s) of "
                            f"{split.annotations}, e.g. {unrecorded[:3]}; rerun the data stage")
        by_image: dict[int, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in instances["annotations"]:
            by_image[ann["image_id"]].append(ann)
        self.annotations = by_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, dict]:
        info = self.images[index]
        image = read_image(self.split.images / info["file_name"], self.split.digests[info["file_name"]])
        return image, {"image_id": info["id"], "annotations": self.annotations[info["id"]]}


def image_processor(size: InputSize) -> DetrImageProcessorPil:
    """DETR's own preprocessing: resize (shortest/longest edge), ImageNet normalisation, padding + mask."""
    return DetrImageProcessorPil(size={"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge})


class DetrCollate:
    """Batch of (image, target) -> pixel_values, pixel_mask, labels, and original sizes (h, w)."""

    def __init__(self, processor: DetrImageProcessorPil, with_labels: bool):
        self.processor = processor
        self.with_labels = with_labels

    def __call__(self, batch: list[tuple[Image.Image, dict]]) -> dict:
        images, targets = zip(*batch)
        encoded = self.processor(
            images=list(images),
            annotations=list(targets) if self.with_labels else None,
            return_tensors="pt",
        )
        out = {
            "pixel_values": encoded["pixel_values"],
            "pixel_mask": encoded["pixel_mask"],
            "image_ids": [t["image_id"] for t in targets],
            "orig_sizes": torch.tensor([[img.height, img.width] for img in images]),
        }
        if self.with_labels:
            out["labels"] = [{"class_labels": lab["class_labels"], "boxes": visible_frame(lab["boxes"], mask)}
                             for lab, mask in zip(encoded["labels"], encoded["pixel_mask"])]
        return out


def visible_frame(boxes: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) boxes relative to the image's own (resized, unpadded) extent.

    The image processor normalises a padded image's label boxes to the padded canvas of the batch, but DETR
    predicts boxes relative to the visible image (as the original DETR trains it, and as the pretrained
    DETR-R50 and post_process_object_detection, hence `detect`, assume). An unpadded image is left exactly as is.
    """
    canvas_h, canvas_w = pixel_mask.shape
    visible_h = int(pixel_mask.any(dim=1).sum())
    visible_w = int(pixel_mask.any(dim=0).sum())
    if (visible_h, visible_w) == (canvas_h, canvas_w):
        return boxes
    scale = torch.tensor([canvas_w / visible_w, canvas_h / visible_h] * 2, dtype=boxes.dtype)
    return boxes * scale
