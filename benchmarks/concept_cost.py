"""What one tile costs with SAM 3 at its real size: one image-encoder pass, then the
text / detection / mask heads once per phrase.

No SAM 3 weights can be had here, so the model is ``transformers``' ``Sam3Config()``
(the released architecture: 1008 px input, 32-layer ViT, 200 queries) with random
weights: timings are those of the real model, its outputs are meaningless. The tile is
the Banepa scene's first 1024 x 1024 px window, run through
:class:`sam_geo.model.sam3_backend.Sam3Backend` (encode once, then ``concepts`` with 1, 2
and 4 phrases against the same features).

Run from the repository root:

    python benchmarks/concept_cost.py [--device cpu] [--threshold 0.5] [--repeats 2]

Prints one JSON object: seconds to build the model, to encode, and per phrase count the
seconds of ``concepts`` (median of ``--repeats``); figures go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import transformers
from rasterio.windows import Window

from sam_geo.model.sam3_backend import Sam3Backend

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "banepa" / "banepa_utm45n.tif"
PHRASES = ("building", "road", "tree", "car")


def character_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP tokenizer over single letters (the real one has 49,408 BPE tokens; the
    token count per phrase, 32, is the same, so the cost is too)."""
    letters = list(string.ascii_lowercase)
    vocab = {"!": 0, **{c: 1 + i for i, c in enumerate(letters)}}
    vocab |= {c + "</w>": len(vocab) + i for i, c in enumerate(letters)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32, pad_token="!")


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = transformers.Sam3Model(transformers.Sam3Config()).eval()
    backend = Sam3Backend(model, character_tokenizer(), device)
    built = time.perf_counter() - start
    with rasterio.open(SCENE) as src:
        rgb = np.moveaxis(src.read((1, 2, 3), window=Window(0, 0, 1024, 1024)), 0, -1)
    vision, _ = backend.encode(rgb)  # warm-up
    report = {
        "device": str(device), "threads": torch.get_num_threads(),
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "build_s": round(built, 1),
        "encode_s": median_seconds(lambda: backend.encode(rgb), args.repeats),
    }
    for count in (1, 2, 4):
        phrases = PHRASES[:count]
        report[f"concepts_{count}_phrases_s"] = median_seconds(
            lambda: backend.concepts(vision, phrases, rgb.shape[:2], args.threshold), args.repeats)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
