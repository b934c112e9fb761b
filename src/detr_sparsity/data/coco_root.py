"""What a local COCO 2017 root holds, and so where the COCO study takes each split's images from.

Kept free of heavy imports: loading a study (`cli.load_study`, which `validate` and the Snakefile use) checks a
local root with it, as well as the data stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VAL_ANNOTATIONS = "annotations/instances_val2017.json"
TRAIN_ANNOTATIONS = "annotations/instances_train2017.json"
VAL_IMAGES = "val2017"
TRAIN_IMAGES = "train2017"


@dataclass(frozen=True)
class RootLayout:
    """The parts of the COCO 2017 layout a local root holds."""

    root: Path
    val_annotations: bool
    val_images: bool
    train_annotations: bool
    train_images: bool

    @property
    def missing(self) -> list[str]:
        """The parts every root needs (val2017 is evaluated in place) that this one lacks."""
        return [part for part, present in ((VAL_ANNOTATIONS, self.val_annotations), (VAL_IMAGES + "/", self.val_images))
                if not present]

    @property
    def name(self) -> str:
        if self.missing:
            return "incomplete"
        if self.train_annotations and self.train_images:
            return "full"
        return "val + train annotations" if self.train_annotations else "val-only"

    def problem(self) -> str | None:
        """Why the study cannot use this root, or None."""
        if not self.missing:
            return None
        found = [p for p, present in ((VAL_ANNOTATIONS, self.val_annotations), (VAL_IMAGES + "/", self.val_images),
                                      (TRAIN_ANNOTATIONS, self.train_annotations),
                                      (TRAIN_IMAGES + "/", self.train_images)) if present]
        return (f"{self.root} lacks {', '.join(self.missing)} "
                f"(found: {', '.join(found) or 'none of the COCO layout'}); "
                f"a COCO root needs at least {VAL_ANNOTATIONS} and {VAL_IMAGES}/ (val-only), and "
                f"{TRAIN_ANNOTATIONS} and {TRAIN_IMAGES}/ too for the full layout")

    def train_source(self, held_out_from_val: int) -> str:
        """Where the train and calibration splits come from, in words."""
        if held_out_from_val:
            return f"{held_out_from_val} val2017 images held out of the evaluation"
        if self.train_annotations and self.train_images:
            return f"{self.root / TRAIN_IMAGES} as is"
        annotations = (f"{self.root / TRAIN_ANNOTATIONS}" if self.train_annotations
                       else "instances_train2017.json from annotations_trainval2017.zip, downloaded")
        return f"train2017 images fetched one by one from base_url (annotations: {annotations})"

    def describe(self, held_out_from_val: int) -> str:
        return (f"COCO root {self.root}: {self.name} layout; evaluation on {self.root / VAL_IMAGES} in place; "
                f"train and calibration images: {self.train_source(held_out_from_val)}")


def root_layout(root: str | Path) -> RootLayout:
    """The layout of a local COCO root: which of the val and train annotation files and image folders it holds."""
    root = Path(root).expanduser()
    return RootLayout(root, (root / VAL_ANNOTATIONS).is_file(), (root / VAL_IMAGES).is_dir(),
                      (root / TRAIN_ANNOTATIONS).is_file(), (root / TRAIN_IMAGES).is_dir())


def root_problem(cfg_data: dict, prefix: str) -> str | None:
    """Why a study's local COCO root cannot serve it, as a params.yaml error line; None when it can (or none is set)."""
    if cfg_data["source"] != "coco" or cfg_data["root"] is None or not Path(cfg_data["root"]).expanduser().is_dir():
        return None  # no root to look into (a missing directory is the config's own error)
    problem = root_layout(cfg_data["root"]).problem()
    return None if problem is None else f"{prefix}.data.root = \"{cfg_data['root']}\" is not allowed: {problem}"


def describe_source(cfg_data: dict) -> str | None:
    """Where the study's images come from, when that depends on what is on disk (a local COCO root's layout)."""
    if cfg_data["source"] != "coco":
        return None
    held_out = cfg_data["held_out_from_val"]
    if cfg_data["root"] is None:
        source = ("val2017 and the annotations downloaded from base_url; train and calibration images: "
                  + (f"{held_out} val2017 images held out of the evaluation" if held_out
                     else "train2017 images fetched one by one"))
        return f"COCO: {source}"
    return root_layout(cfg_data["root"]).describe(held_out)
