"""Text prompts: an open-vocabulary detector that turns phrases into boxes per tile.

:class:`TextDetector` wraps a Hugging Face ``transformers`` zero-shot object detector
behind one call, :meth:`TextDetector.detect`: an (rows, cols, 3) uint8 array and a list
of phrases in; boxes (``x0, y0, x1, y1`` in the array's pixels, the same convention as
:class:`sam_geo.io.prompts.PromptBatch` in tile pixels), scores and the index of the phrase
each box belongs to out. Those boxes become SAM box prompts.

Two model families are supported (any checkpoint of them, by hub name or local folder):

* **OWLv2** (``google/owlv2-base-patch16-ensemble``, the default; Apache-2.0): each phrase
  is a separate text query scored as a whole; only ``box_threshold`` applies.
* **Grounding DINO** (``IDEA-Research/grounding-dino-tiny`` ...): the phrases are joined
  into one caption (``"a. b."``); a box is kept when its best token score exceeds
  ``box_threshold``, and is assigned to the phrase whose tokens score highest, provided
  that score exceeds ``text_threshold``.

Boxes come from the processor's own post-processing with ``target_sizes``; they are then
clipped to the array, boxes left without area are dropped, and overlapping boxes of the
same phrase are suppressed (``nms_iou``). Models load with ``local_files_only=True`` when
``SAM_GEO_OFFLINE`` is set, so an offline run uses only the Hugging Face cache or a local
folder, and fails with a :class:`~sam_geo.errors.WeightsNotFoundError` that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from sam_geo.errors import ConfigError, WeightsNotFoundError
from sam_geo.model.registry import downloads_allowed

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "Detections",
    "TextDetector",
    "require_transformers",
]

DEFAULT_TEXT_MODEL = "google/owlv2-base-patch16-ensemble"
"""The detector ``sam-geo text`` uses unless told otherwise (OWLv2 B/16, Apache-2.0)."""

DetectorKind = Literal["owlv2", "grounding_dino"]

_KINDS: dict[str, DetectorKind] = {"owlv2": "owlv2", "grounding-dino": "grounding_dino"}
"""``config.model_type`` -> how the detector is prompted and post-processed."""

DEFAULT_THRESHOLDS: dict[DetectorKind, tuple[float, float]] = {
    "owlv2": (0.1, 0.0),
    "grounding_dino": (0.35, 0.25),
}
"""(box_threshold, text_threshold) used when ``detect`` is not given them; OWLv2's sigmoid
scores run much lower than Grounding DINO's (the thresholds of their model cards)."""

DEFAULT_NMS_IOU = 0.5
"""Boxes of one phrase overlapping a higher-scoring one by more than this IoU are dropped."""


def require_transformers() -> None:
    """Check that ``transformers`` imports (only text prompts need it), e.g. on the
    driver before any tile runs.

    Raises:
        ConfigError: it is not installed or fails to import; the message says to
            ``pip install "sam-geo[text]"``.
    """
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise _transformers_missing(exc) from exc


def _transformers_missing(exc: ImportError) -> ConfigError:
    """The error for a missing ``transformers``: what needs it and how to install it."""
    return ConfigError(
        "text prompts need the transformers package (the grounding detectors come from it), which the core "
        'install of sam-geo leaves out: pip install "sam-geo[text]" (in a checkout: pip install -e ".[text]"). '
        f"Import error: {exc}"
    )


class Detections(NamedTuple):
    """What :meth:`TextDetector.detect` found, best score first.

    ``boxes``: (n, 4) float64 ``x0, y0, x1, y1`` in the input array's pixels (x = column,
    y = row, pixel edges: 0 .. cols, 0 .. rows); ``scores``: (n,) float32 in [0, 1];
    ``labels``: (n,) int64 index into the phrases given.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


class TextDetector:
    """An open-vocabulary detector (OWLv2 or Grounding DINO) with its processor.

    Build it with :meth:`from_pretrained` (a hub name or a local folder) or, for tests,
    :meth:`from_config` (random weights). ``model`` and ``processor`` are the
    ``transformers`` objects; the model is put in eval mode on ``device``.
    """

    def __init__(self, model: Any, processor: Any, *, device: str | torch.device = "cpu", name: str | None = None):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in _KINDS:
            raise ConfigError(
                f"text detector {name or model_type!r} is a {model_type!r} model; sam-geo supports "
                f"OWLv2 and Grounding DINO checkpoints (model types: {', '.join(_KINDS)})."
            )
        self.kind: DetectorKind = _KINDS[model_type]
        self.device = _device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.name = name or model_type

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_TEXT_MODEL,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> TextDetector:
        """Load a detector and its processor by hub name or local folder (passed through
        unchanged to ``transformers``' ``from_pretrained``).

        ``local_files_only=True`` is passed when ``SAM_GEO_OFFLINE`` is set, unless given
        in ``kwargs`` (which also go to both ``from_pretrained`` calls: ``revision``,
        ``cache_dir``, ``dtype`` ...).

        Raises:
            WeightsNotFoundError: the model cannot be found or fetched.
            ConfigError: it is not an OWLv2 or Grounding DINO checkpoint, or
                ``transformers`` is not installed (``pip install "sam-geo[text]"``).
        """
        try:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
        except ImportError as exc:
            raise _transformers_missing(exc) from exc

        kwargs.setdefault("local_files_only", not downloads_allowed())
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(name_or_path, **kwargs)
        except OSError as exc:
            fix = (
                "Offline (SAM_GEO_OFFLINE or local_files_only), only the Hugging Face cache "
                "(HF_HOME) and local folders are searched: pass a folder written by "
                "save_pretrained (model and processor), or allow downloads."
                if kwargs["local_files_only"]
                else "Check the name or path, and the network."
            )
            raise WeightsNotFoundError(
                f"cannot load text detector {name_or_path!r}: {' '.join(str(exc).split())}. {fix}"
            ) from exc
        except ValueError as exc:  # transformers: "Unrecognized configuration class ..."
            raise ConfigError(
                f"{name_or_path!r} is not a zero-shot object detection model: {' '.join(str(exc).split())}"
            ) from exc
        return cls(model, processor, device=device, name=name_or_path)

    @classmethod
    def from_config(cls, config: Any, processor: Any, device: str | torch.device = "cpu") -> TextDetector:
        """A randomly initialised detector from a ``transformers`` config (tests)."""
        try:
            from transformers import AutoModelForZeroShotObjectDetection
        except ImportError as exc:
            raise _transformers_missing(exc) from exc

        return cls(AutoModelForZeroShotObjectDetection.from_config(config), processor, device=device)

    def thresholds(self) -> tuple[float, float]:
        """This detector's default (box_threshold, text_threshold)."""
        return DEFAULT_THRESHOLDS[self.kind]

    @torch.inference_mode()
    def detect(
        self,
        rgb: np.ndarray,
        phrases: Sequence[str],
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        nms_iou: float | None = DEFAULT_NMS_IOU,
    ) -> Detections:
        """Boxes of the objects ``phrases`` describe in an (rows, cols, 3) uint8 array.

        Args:
            rgb: the image (a tile), RGB, uint8.
            phrases: what to look for, e.g. ``["building", "swimming pool"]``; labels
                index this list.
            box_threshold: minimum box score; default :data:`DEFAULT_THRESHOLDS`.
            text_threshold: Grounding DINO only: minimum token score of the phrase a box
                is assigned to (OWLv2 scores each phrase as a whole).
            nms_iou: suppress boxes of the same phrase overlapping a better one by more
                than this IoU; None keeps all.

        Raises:
            ConfigError: no phrases, an empty phrase, or a threshold outside [0, 1].
            ValueError: ``rgb`` is not an (rows, cols, 3) uint8 array.
        """
        phrases = _check_phrases(phrases, self.kind)
        default_box, default_text = self.thresholds()
        box_threshold = _check_fraction("box threshold", default_box if box_threshold is None else box_threshold)
        text_threshold = _check_fraction("text threshold", default_text if text_threshold is None else text_threshold)
        if nms_iou is not None:
            _check_fraction("NMS IoU", nms_iou)
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (rows, cols, 3) uint8 RGB array, got {_describe_array(rgb)}")
        if self.kind == "owlv2":
            boxes, scores, labels = self._detect_owlv2(rgb, phrases, box_threshold)
        else:
            boxes, scores, labels = self._detect_grounding_dino(rgb, phrases, box_threshold, text_threshold)
        return _finish(boxes, scores, labels, rgb.shape[:2], nms_iou)

    def _detect_owlv2(
        self, rgb: np.ndarray, phrases: list[str], box_threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One text query per phrase; labels are query indices."""
        inputs = self.processor(
            text=[phrases], images=rgb, return_tensors="pt", truncation=True, input_data_format="channels_last"
        ).to(self.device)
        outputs = self.model(**inputs)
        # OWLv2 pads the image to a square (bottom / right) before resizing, so its
        # normalised boxes are fractions of the padded side for both axes.
        side = max(rgb.shape[:2])
        result = self.processor.post_process_grounded_object_detection(
            outputs, threshold=box_threshold, target_sizes=[(side, side)]
        )[0]
        return result["boxes"], result["scores"], result["labels"]

    def _detect_grounding_dino(
        self, rgb: np.ndarray, phrases: list[str], box_threshold: float, text_threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One caption ``"a. b."``; each kept box is labelled with its best-scoring phrase."""
        caption, spans = _caption(phrases)
        inputs = self.processor(
            images=rgb, text=caption, return_tensors="pt", input_data_format="channels_last"
        ).to(self.device)
        token_phrase = self._token_phrases(caption, spans, inputs["input_ids"][0])
        outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=[rgb.shape[:2]],
        )[0]
        # the same selection as the post-processing (best token score > box_threshold) ...
        probs = outputs.logits[0].sigmoid()  # (queries, max_text_len)
        kept = probs[probs.max(dim=-1).values > box_threshold]
        if len(kept) != len(result["boxes"]):
            raise RuntimeError("Grounding DINO post-processing kept a different set of boxes than expected")
        # ... then per phrase, the best score of its tokens
        n_tokens = min(len(token_phrase), kept.shape[-1])
        owner = torch.as_tensor(token_phrase[:n_tokens], device=kept.device)
        phrase_scores = torch.full((len(kept), len(phrases)), -1.0, device=kept.device)
        for p in range(len(phrases)):
            tokens = owner == p
            if tokens.any():
                phrase_scores[:, p] = kept[:, :n_tokens][:, tokens].max(dim=-1).values
        best_score, labels = phrase_scores.max(dim=-1)
        ok = best_score > text_threshold
        return result["boxes"][ok], result["scores"][ok], labels[ok]

    def _token_phrases(self, caption: str, spans: list[tuple[int, int]], input_ids: torch.Tensor) -> np.ndarray:
        """(tokens,) index of the phrase each caption token belongs to, -1 for none."""
        encoding = self.processor.tokenizer(caption, return_offsets_mapping=True)
        if list(encoding["input_ids"]) != input_ids.tolist():
            raise RuntimeError("the tokenizer and the processor tokenized the caption differently")
        owner = np.full(len(encoding["input_ids"]), -1, dtype=np.int64)
        for t, (start, stop) in enumerate(encoding["offset_mapping"]):
            for p, (s, e) in enumerate(spans):
                if stop > start and s <= start and stop <= e:
                    owner[t] = p
        return owner


# --- helpers ----------------------------------------------------------------------


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid device {device!r}: use e.g. 'cpu', 'cuda' or 'cuda:0'") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; use cpu")
    return target


def _check_phrases(phrases: Sequence[str], kind: DetectorKind) -> list[str]:
    if isinstance(phrases, str):
        phrases = [phrases]
    cleaned = [p.strip() if isinstance(p, str) else p for p in phrases]
    if not cleaned:
        raise ConfigError("no text phrases given; pass at least one, e.g. 'building'")
    for phrase in cleaned:
        if not isinstance(phrase, str) or not phrase:
            raise ConfigError(f"text phrases must be non-empty strings, got {phrase!r}")
        if kind == "grounding_dino" and "." in phrase.rstrip("."):
            raise ConfigError(
                f"text phrase {phrase!r} contains '.', which Grounding DINO uses to separate phrases"
            )
    return [p.rstrip(".").strip() if kind == "grounding_dino" else p for p in cleaned]


def _check_fraction(what: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{what} must be between 0 and 1, got {value!r}")
    return float(value)


def _caption(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's caption ``"a. b."`` (lower case) and each phrase's character span."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for phrase in phrases:
        text = phrase.lower()
        spans.append((at, at + len(text)))
        parts.append(text)
        at += len(text) + 2  # ". "
    return ". ".join(parts) + ".", spans


def _describe_array(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _finish(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    shape: tuple[int, int],
    nms_iou: float | None,
) -> Detections:
    """Clip to the array, drop boxes without area, suppress overlaps per phrase, sort."""
    rows, cols = shape
    boxes = boxes.detach().float().cpu().reshape(-1, 4)
    scores = scores.detach().float().cpu().reshape(-1)
    labels = labels.detach().cpu().reshape(-1).long()
    limits = torch.tensor([cols, rows, cols, rows], dtype=boxes.dtype)
    boxes = torch.minimum(boxes.clamp(min=0.0), limits)
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, labels = boxes[has_area], scores[has_area], labels[has_area]
    if nms_iou is not None and len(boxes):
        from torchvision.ops import batched_nms

        order = batched_nms(boxes, scores, labels, nms_iou)  # sorted by decreasing score
    else:
        order = torch.argsort(scores, descending=True, stable=True)
    return Detections(
        boxes[order].numpy().astype(np.float64),
        scores[order].numpy().astype(np.float32),
        labels[order].numpy().astype(np.int64),
    )
