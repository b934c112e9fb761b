"""Load the dense DETR a study works on: from the hub (or a local copy), or the stage's saved model.

The model stage records the sha256 of each weights file it saves in `model_info.json`; loading a directory that
holds that record checks the files against it first, so weights that changed or were cut short fail naming the
file instead of loading as a different model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import DetrForObjectDetection

MODEL_INFO = "model_info.json"
WEIGHTS_DIGESTS = "weights_sha256"  # model_info.json's record: weights file name -> sha256 of its bytes


class WeightsError(ValueError):
    """A model's weights are not those recorded, or cannot be read; the message names the file."""


def _file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def weights_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a saved model (one, or the shards of a large one)."""
    return sorted(Path(model_dir).glob("*.safetensors"))


def record_weights(model_dir: Path) -> dict[str, str]:
    """The sha256 of every weights file in `model_dir`, by file name: the record `load_detr` checks."""
    files = weights_files(model_dir)
    if not files:
        raise WeightsError(f"{model_dir} holds no *.safetensors weights")
    return {f.name: _file_sha256(f) for f in files}


def check_weights(model_dir: Path) -> None:
    """Check the weights files of `model_dir` against the digests in its model_info.json, if it holds them."""
    info_path = Path(model_dir) / MODEL_INFO
    if not info_path.is_file():
        return
    try:
        recorded = json.loads(info_path.read_bytes()).get(WEIGHTS_DIGESTS)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise WeightsError(f"{info_path} is not a valid model record: {err}") from None
    for name, digest in (recorded or {}).items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise WeightsError(f"weights file {path} is missing ({info_path} records it)")
        actual = _file_sha256(path)
        if actual != digest:
            raise WeightsError(f"weights file {path} is not the one the model stage saved (sha256 {actual[:16]}..., "
                               f"{info_path} records {digest[:16]}...): it changed or was cut short; restore it, "
                               "or rerun the model stage")


def _unreadable_weights(model_dir: Path) -> str:
    """Which weights file of `model_dir` does not open as safetensors, and why; empty if each opens."""
    from safetensors import safe_open

    for path in weights_files(model_dir):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:
            return f"weights file {path} cannot be read ({type(err).__name__}: {err})"
    return ""


def load_detr(name_or_path: str | Path, revision: str | None = None, device: str = "cpu") -> DetrForObjectDetection:
    """A DetrForObjectDetection in eval mode on `device`, from a hub id (at `revision`) or a local directory.

    facebook/detr-resnet-50 at revision `no_timm` uses transformers' own ResNet, so timm is not needed. A local
    directory's weights are checked against its recorded digests (`check_weights`), and a failure to load names the
    file.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_weights(local)
        try:
            model = DetrForObjectDetection.from_pretrained(local)
        except Exception as err:
            reason = _unreadable_weights(local) or f"{type(err).__name__}: {err}"
            raise WeightsError(f"cannot load the DETR saved in {local}: {reason}") from err
    else:
        model = DetrForObjectDetection.from_pretrained(str(name_or_path), revision=revision)
    return model.to(device).eval()


def is_local(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` names a local model directory (else a hub id)."""
    return Path(name_or_path).expanduser().is_dir()


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: equal digests, unchanged weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
