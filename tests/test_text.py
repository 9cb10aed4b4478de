"""Tests of sam_geo.model.detector: phrases -> boxes with OWLv2 and Grounding DINO.

No model is downloaded: tiny randomly initialised detectors are built from small
``transformers`` configs, with tokenizers made from vocabularies written here (a
character-level CLIP BPE for OWLv2, a word-level BERT WordPiece for Grounding DINO).
Random detectors find nothing meaningful, so shapes, ranges and labels are checked on
their output, and the box frames and phrase labels on hand-made model outputs.
"""

from __future__ import annotations

import string
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from sam_geo.errors import ConfigError, WeightsNotFoundError
from sam_geo.model.detector import DEFAULT_TEXT_MODEL, Detections, TextDetector
from sam_geo.settings import DEFAULT_DETECTOR, Settings

ROWS, COLS = 200, 256


def tiny_owlv2() -> TextDetector:
    """OWLv2 with 1-layer 32-wide towers, 64 px input (16 patches / box queries)."""
    letters = list(string.ascii_lowercase)
    vocab = {"!": 0, **{c: 1 + i for i, c in enumerate(letters)}}
    vocab |= {c + "</w>": len(vocab) + i for i, c in enumerate(letters)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id: OWL pools the text at argmax(input_ids)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16, pad_token="!")
    processor = transformers.Owlv2Processor(
        image_processor=transformers.Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    config = transformers.Owlv2Config(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    return TextDetector.from_config(config, processor)


def tiny_grounding_dino() -> TextDetector:
    """Grounding DINO with a 4-stage Swin of width 8, a 1-layer BERT and 20 queries."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "building", "road", "swimming", "pool"]
    vocab = {w: i for i, w in enumerate(words + list(string.ascii_lowercase))}
    tokenizer = transformers.BertTokenizer(vocab=vocab, do_lower_case=True)
    processor = transformers.GroundingDinoProcessor(
        image_processor=transformers.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer,
    )
    config = transformers.GroundingDinoConfig(
        backbone_config=transformers.SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=2,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=transformers.BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=32,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(0)
    return TextDetector.from_config(config, processor)


@pytest.fixture(scope="module")
def owlv2() -> TextDetector:
    return tiny_owlv2()


@pytest.fixture(scope="module")
def gdino() -> TextDetector:
    return tiny_grounding_dino()


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    rgb = np.random.default_rng(0).integers(0, 80, (ROWS, COLS, 3), dtype=np.uint8)
    rgb[50:120, 60:160] = (210, 200, 190)
    return rgb


def check_detections(found: Detections, n_phrases: int, rows: int, cols: int) -> None:
    boxes, scores, labels = found  # a plain tuple too
    n = len(boxes)
    assert boxes.shape == (n, 4) and boxes.dtype == np.float64
    assert scores.shape == (n,) and scores.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= cols).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= rows).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((scores >= 0) & (scores <= 1)).all() and (np.diff(scores) <= 0).all()
    assert ((labels >= 0) & (labels < n_phrases)).all()


# --- random tiny models -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 256), (ROWS, COLS), (COLS, ROWS)])
def test_owlv2_detect_shapes_and_ranges(owlv2: TextDetector, shape: tuple[int, int]) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (*shape, 3), dtype=np.uint8)
    found = owlv2.detect(rgb, ["building", "road"], box_threshold=0.0, nms_iou=None)
    assert owlv2.kind == "owlv2"
    assert 0 < len(found.boxes) <= 16  # one box per image patch, minus those left without area
    check_detections(found, 2, *shape)
    assert set(found.labels) <= {0, 1}


def test_owlv2_thresholds_and_nms(owlv2: TextDetector, tile: np.ndarray) -> None:
    everything = owlv2.detect(tile, ["building", "road"], box_threshold=0.0, nms_iou=None)
    suppressed = owlv2.detect(tile, ["building", "road"], box_threshold=0.0, nms_iou=0.1)
    check_detections(suppressed, 2, ROWS, COLS)
    assert len(suppressed.boxes) <= len(everything.boxes)
    nothing = owlv2.detect(tile, ["building"], box_threshold=1.0)
    assert nothing.boxes.shape == (0, 4) and nothing.scores.shape == (0,) and nothing.labels.shape == (0,)
    single = owlv2.detect(tile, "building", box_threshold=0.0)  # one phrase as a plain string
    assert set(single.labels) <= {0}


def test_grounding_dino_detect_shapes_and_ranges(gdino: TextDetector, tile: np.ndarray) -> None:
    found = gdino.detect(tile, ["building", "road", "swimming pool"], box_threshold=0.0, text_threshold=0.0)
    assert gdino.kind == "grounding_dino"
    assert 0 < len(found.boxes) <= 20
    check_detections(found, 3, ROWS, COLS)


# --- box frames and labels on hand-made outputs ---------------------------------------


def fake_model(detector: TextDetector, monkeypatch: pytest.MonkeyPatch, **outputs: torch.Tensor) -> list[dict]:
    """Make ``detector.model`` return ``outputs``; returns the recorded model inputs."""
    calls: list[dict[str, Any]] = []

    def forward(**inputs: Any) -> SimpleNamespace:
        calls.append(inputs)
        return SimpleNamespace(**outputs)

    monkeypatch.setattr(detector, "model", forward)
    return calls


def test_owlv2_boxes_are_in_array_pixels(
    owlv2: TextDetector, tile: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OWLv2 pads to a square: normalised boxes are fractions of the longer side."""
    logits = torch.full((1, 16, 2), -6.0)
    logits[0, 0, 1] = 5.0  # query 0: phrase 1
    logits[0, 1, 0] = 3.0  # query 1: phrase 0, lower score
    boxes = torch.full((1, 16, 4), 0.1)
    boxes[0, 0] = torch.tensor([0.5, 0.25, 0.2, 0.1])  # cx, cy, w, h
    boxes[0, 1] = torch.tensor([0.9, 0.9, 0.4, 0.4])  # reaches past the array: clipped
    calls = fake_model(owlv2, monkeypatch, logits=logits, pred_boxes=boxes)
    found = owlv2.detect(tile, ["building", "road"], box_threshold=0.5)
    assert calls[0]["input_ids"].shape == (2, 16) and calls[0]["pixel_values"].shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(found.labels, [1, 0])
    np.testing.assert_allclose(found.scores, torch.sigmoid(torch.tensor([5.0, 3.0])).numpy(), rtol=1e-6)
    side = max(ROWS, COLS)
    np.testing.assert_allclose(found.boxes[0], [0.4 * side, 0.2 * side, 0.6 * side, 0.3 * side], rtol=1e-5)
    np.testing.assert_allclose(found.boxes[1], [0.7 * side, 0.7 * side, COLS, ROWS], rtol=1e-5)


def test_grounding_dino_labels_phrases_by_their_tokens(
    gdino: TextDetector, tile: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # caption "building. road. swimming pool." -> [CLS] building . road . swimming pool . [SEP]
    logits = torch.full((1, 20, 32), -8.0)
    logits[0, 0, 3] = 4.0  # "road"
    logits[0, 1, 6] = 2.0  # "pool" (second token of the third phrase)
    logits[0, 2, 2] = 6.0  # only the "." after "building": a box, but no phrase above text_threshold
    boxes = torch.full((1, 20, 4), 0.25)
    boxes[0, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5])
    fake_model(gdino, monkeypatch, logits=logits, pred_boxes=boxes)
    found = gdino.detect(tile, ["building", "road", "swimming pool."], box_threshold=0.5, text_threshold=0.3)
    np.testing.assert_array_equal(found.labels, [1, 2])
    np.testing.assert_allclose(found.scores, torch.sigmoid(torch.tensor([4.0, 2.0])).numpy(), rtol=1e-6)
    # Grounding DINO keeps the aspect ratio: x scales with the columns, y with the rows
    np.testing.assert_allclose(found.boxes[0], [0.25 * COLS, 0.25 * ROWS, 0.75 * COLS, 0.75 * ROWS], rtol=1e-5)


# --- loading --------------------------------------------------------------------------


class Recorder:
    """Stands in for transformers' from_pretrained classmethods."""

    def __init__(self, result: Any = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.result = result
        self.error = error

    def __call__(self, name: str, **kwargs: Any) -> Any:
        self.calls.append((name, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


def patch_loaders(monkeypatch: pytest.MonkeyPatch, model: Recorder, processor: Recorder) -> None:
    monkeypatch.setattr(transformers.AutoModelForZeroShotObjectDetection, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", processor)


def test_from_pretrained_passes_the_name_through(owlv2: TextDetector, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = Recorder(owlv2.model), Recorder(owlv2.processor)
    patch_loaders(monkeypatch, model, processor)
    monkeypatch.setenv("SAM_GEO_OFFLINE", "1")
    detector = TextDetector.from_pretrained("google/owlv2-base-patch16-ensemble")
    assert model.calls == [("google/owlv2-base-patch16-ensemble", {"local_files_only": True})]
    assert processor.calls == model.calls
    assert detector.kind == "owlv2" and detector.name == "google/owlv2-base-patch16-ensemble"
    assert DEFAULT_TEXT_MODEL == "google/owlv2-base-patch16-ensemble"
    assert Settings().detector == DEFAULT_DETECTOR == DEFAULT_TEXT_MODEL  # what a run uses unless told otherwise

    monkeypatch.delenv("SAM_GEO_OFFLINE")
    TextDetector.from_pretrained("/models/my-owlv2", revision="abc")
    assert model.calls[-1] == ("/models/my-owlv2", {"revision": "abc", "local_files_only": False})


def test_from_pretrained_errors(owlv2: TextDetector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM_GEO_OFFLINE", "1")
    patch_loaders(monkeypatch, Recorder(owlv2.model), Recorder(error=OSError("not in the cache")))
    with pytest.raises(WeightsNotFoundError, match=r"'google/owlv2-base-patch16-ensemble'.*SAM_GEO_OFFLINE"):
        TextDetector.from_pretrained()
    patch_loaders(monkeypatch, Recorder(error=ValueError("Unrecognized configuration class")), Recorder(None))
    with pytest.raises(ConfigError, match="not a zero-shot object detection model"):
        TextDetector.from_pretrained("bert-base-uncased")
    other = SimpleNamespace(config=SimpleNamespace(model_type="detr"))
    with pytest.raises(ConfigError, match="OWLv2 and Grounding DINO"):
        TextDetector(other, None)


def test_detect_rejects_bad_input(owlv2: TextDetector, gdino: TextDetector, tile: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="no text phrases"):
        owlv2.detect(tile, [])
    with pytest.raises(ConfigError, match="non-empty"):
        owlv2.detect(tile, ["building", "  "])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        owlv2.detect(tile, ["building"], box_threshold=1.5)
    with pytest.raises(ConfigError, match="separate phrases"):
        gdino.detect(tile, ["a.b"])
    with pytest.raises(ValueError, match="uint8"):
        owlv2.detect(tile.astype(np.float32), ["building"])
    with pytest.raises(ValueError, match=r"\(rows, cols, 3\)"):
        owlv2.detect(tile[..., 0], ["building"])
