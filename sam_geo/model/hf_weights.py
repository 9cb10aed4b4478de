"""Weights of models loaded through ``transformers`` (SAM 3): a Hugging Face model folder.

A ``transformers`` model is a folder, not one file: ``config.json``, the weights
(``model.safetensors``, possibly sharded, or ``pytorch_model.bin``) and, for SAM 3, the
tokenizer files. :func:`sam_geo.model.registry.resolve_weights` looks for one with the
helpers here, in this order:

1. **explicit** -- the ``--weights`` path: the folder itself, or a weights file inside
   one (its folder is used). A lone checkpoint of the model's official release (SAM 3's
   ``sam3.pt``, state-dict names ``detector.*`` / ``tracker.*``) is recognised and
   refused with what to download instead: ``transformers`` cannot load that layout (the
   same holds for the ``sam2`` package's ``.pt`` files: use the ``sam2.1_hiera_*`` models
   without ``_hf`` for those).
2. **cache** -- ``<weights cache>/<spec.filename>/`` (``SAM_GEO_WEIGHTS_DIR`` or the user
   cache, as for the other models).
3. **huggingface** -- the Hugging Face cache (``HF_HOME``), when the model was
   downloaded there before (``snapshot_download(local_files_only=True)``).
4. **download** -- ``snapshot_download`` from the Hub, only when downloads are allowed.
   Gated models (SAM 3: SAM License) need the licence accepted on the model's page and
   a token (``hf auth login``); without them this step fails and the error says so.

Nothing is written outside the Hugging Face cache, and nothing at all when the folder is
found locally. The "sha256" recorded for a folder is a fingerprint, not a file hash:
sha256 of ``config.json`` plus the names and byte sizes of the weight files (hashing a
3.4 GB SAM 3 checkpoint on every run would cost more than loading it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sam_geo.errors import WeightsError
from sam_geo.model.checkpoints import one_line_reason

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""File suffixes of weights inside a model folder (or given alone with ``--weights``)."""

OFFICIAL_PREFIXES = ("detector.", "tracker.")
"""State-dict name prefixes of Meta's SAM 3 release checkpoint (``sam3.pt``)."""


@dataclass(frozen=True)
class FolderAttempt:
    """One place looked at for a model folder and why it gave nothing."""

    place: str
    reason: str


def weight_files(folder: Path) -> list[Path]:
    """The weight files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


MODEL_TYPES = {"sam3": ("sam3", "sam3_video")}
"""``config.json`` model types accepted for a registry ``arch`` (others: the arch itself).
``transformers``' code loads ``facebook/sam3`` as a ``sam3_video`` checkpoint (detector and
tracker; not checked here against the real folder); ``Sam3Model``
loads its detector part."""


def folder_problem(folder: Path, model_type: str) -> str | None:
    """Why ``folder`` is not a ``transformers`` folder of ``model_type`` (or of a type
    :data:`MODEL_TYPES` accepts for it); None when it is."""
    if not folder.is_dir():
        return "not found"
    config = folder / "config.json"
    if not config.is_file():
        return "no config.json in it"
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        return f"config.json cannot be read: {one_line_reason(exc)}"
    accepted = MODEL_TYPES.get(model_type, (model_type,))
    if found not in accepted:
        return f"config.json is of model_type {found!r}, not {' or '.join(map(repr, accepted))}"
    if not weight_files(folder):
        return "config.json but no weights file (*.safetensors, *.bin) in it"
    return None


def folder_fingerprint(folder: Path) -> str:
    """sha256 of ``config.json`` plus each weight file's name and size (see module docs)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in weight_files(folder):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def explicit_folder(path: Path, model_type: str, repo: str, gated: bool = True) -> Path:
    """The model folder the user's ``--weights`` names (a folder or a file inside one).

    Raises:
        WeightsError: the path is missing, an official release checkpoint, or not a
            ``transformers`` folder of ``model_type``; the message says what to pass.
    """
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise WeightsError(f"--weights {path} does not exist. {download_hint(repo, gated)}")
    if path.is_file() and is_official_release(path):
        raise WeightsError(
            f"--weights {path} is the official release checkpoint of the model (state-dict names "
            f"{', '.join(OFFICIAL_PREFIXES)}*), which transformers cannot load. {download_hint(repo, gated)}"
        )
    problem = folder_problem(folder, model_type)
    if problem is not None:
        raise WeightsError(f"--weights {path}: folder {folder} is not a {model_type} model folder ({problem}). "
                           f"{download_hint(repo, gated)}")
    return folder


def is_official_release(path: Path) -> bool:
    """Whether a weights file holds Meta's release layout (``detector.*``/``tracker.*``
    names, possibly under ``"model"``); unreadable files are not."""
    keys = _state_dict_names(path)
    return bool(keys) and all(k.startswith(OFFICIAL_PREFIXES) for k in keys)


def _state_dict_names(path: Path) -> list[str]:
    """Tensor names of a safetensors or torch file; [] when it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return list(handle.keys())
        import torch

        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not the release layout"
        return []
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    return [k for k in loaded if isinstance(k, str)] if isinstance(loaded, dict) else []


def huggingface_folder(repo: str, model_type: str, *, download: bool) -> tuple[Path | None, FolderAttempt]:
    """The model's folder from the Hugging Face cache (``download=False``) or the Hub.

    Returns the folder (None when it failed) and the attempt, for the error listing.
    """
    from huggingface_hub import snapshot_download

    place = f"Hugging Face {'Hub' if download else 'cache'} ({repo})"
    try:
        folder = Path(snapshot_download(repo, local_files_only=not download))
    except Exception as exc:  # noqa: BLE001 - hub errors (gated, offline, missing) become reasons
        return None, FolderAttempt(place, _hub_reason(exc))
    problem = folder_problem(folder, model_type)
    if problem is not None:
        return None, FolderAttempt(place, f"{folder}: {problem}")
    return folder, FolderAttempt(place, "found")


def _hub_reason(exc: Exception) -> str:
    name = type(exc).__name__
    if name == "GatedRepoError":
        return "gated: accept the licence on the model's page and log in (hf auth login)"
    if name == "LocalEntryNotFoundError":
        return "not downloaded there"
    return one_line_reason(exc)


def download_hint(repo: str, gated: bool = True) -> str:
    """What to do to get a Hugging Face model's folder (``gated``: behind a licence)."""
    if not gated:
        return (f"Run online once (the folder is downloaded into the Hugging Face cache), or download it "
                f"(hf download {repo} --local-dir DIR) and pass --weights DIR.")
    return (
        f"Accept the licence at https://huggingface.co/{repo}, then either log in (hf auth login) and run "
        f"online once, or download the folder (hf download {repo} --local-dir DIR) and pass --weights DIR."
    )
