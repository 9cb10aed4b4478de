"""Mask-decoder milliseconds per prompt against one image embedding, by batch size.

    python benchmarks/decoder_batch.py [--device cpu|cuda] [--model mobile_sam]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import WEIGHTS
from sam_geo.engine import EngineConfig, TileSegmenter
from sam_geo.prompts import PromptBatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--sizes", default="1,2,4,8,16,64")
    args = parser.parse_args()
    segmenter = TileSegmenter(EngineConfig(args.model, str(WEIGHTS), device=args.device))
    rgb = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    segmenter.backend.encode(rgb)
    start = time.perf_counter()
    embedding, input_hw = segmenter.backend.encode(rgb)
    print(f"encode 1024 x 1024: {time.perf_counter() - start:.2f} s")
    for size in map(int, args.sizes.split(",")):
        boxes = np.tile([[100.0, 100.0, 180.0, 160.0]], (size, 1))
        batch = PromptBatch(np.arange(size), boxes, np.zeros((size, 0, 2)), np.zeros((size, 0), np.int32))
        segmenter.backend.decode(embedding, input_hw, (1024, 1024), batch)
        start, repeats = time.perf_counter(), 3
        for _ in range(repeats):
            segmenter.backend.decode(embedding, input_hw, (1024, 1024), batch)
        per_prompt = (time.perf_counter() - start) / repeats / size
        print(f"batch {size:4d}: {1000 * per_prompt:.1f} ms per prompt")


if __name__ == "__main__":
    main()
