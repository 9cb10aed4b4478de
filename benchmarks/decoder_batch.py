"""Mask-decoder milliseconds per prompt against one image embedding, by batch size.

Box prompts through ``SamBackend.decode`` (one mask each, as prompted mode), or with
``--points`` single-point prompts with SAM's three masks (as automatic mode), under the
autocast precision given (``auto``: what a run picks on this device).

    python benchmarks/decoder_batch.py [--device cpu|cuda] [--model mobile_sam] [--precision fp32|bf16] [--points] [--official | --no-low-rank]

Box prompts go through the logits windows a run uses, so with fp32 weights on CPU
they take the low-rank path of ``sam_geo.model.lowrank``; ``--no-low-rank`` times the
factorized path instead.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import WEIGHTS
from sam_geo.io.prompts import PromptBatch
from sam_geo.modes.automatic import _decode_points
from sam_geo.run.host import HostConfig, ModelHost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--sizes", default="1,2,4,8,16,64")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--points", action="store_true", help="point prompts, three masks each (automatic mode)")
    parser.add_argument("--official", action="store_true",
                        help="segment-anything's own MaskDecoder (under autocast) instead of sam-geo's CPU copy")
    parser.add_argument("--no-low-rank", action="store_true",
                        help="box prompts through the factorized CPU decoder, not its low-rank path")
    args = parser.parse_args()
    segmenter = ModelHost(HostConfig(args.model, str(WEIGHTS), device=args.device, precision=args.precision))
    if args.official:
        segmenter.backend._cpu_decoder = None
    elif args.no_low_rank and segmenter.backend._cpu_decoder is not None:
        segmenter.backend._cpu_decoder.low_rank = False
    print(f"{args.model} on {args.device}, autocast {segmenter.autocast_dtype}, "
          f"{'points x 3 masks' if args.points else 'boxes'}, "
          f"{'official decoder' if args.official or segmenter.backend._cpu_decoder is None else 'CPU decoder copy'}"
          f"{', low-rank path for boxes' if getattr(segmenter.backend._cpu_decoder, 'low_rank', False) else ''}")
    rgb = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    segmenter.encode(rgb)
    start = time.perf_counter()
    embedding, input_hw = segmenter.encode(rgb)
    print(f"encode 1024 x 1024: {time.perf_counter() - start:.2f} s")
    for size in map(int, args.sizes.split(",")):
        boxes = np.tile([[100.0, 100.0, 180.0, 160.0]], (size, 1))
        batch = PromptBatch(np.arange(size), boxes, np.zeros((size, 0, 2)), np.zeros((size, 0), np.int32))
        points = np.random.default_rng(size).uniform(0, 1024, (size, 2))

        def run() -> None:
            with segmenter.model_call():
                if args.points:
                    _decode_points(segmenter.backend, embedding, points)
                else:
                    segmenter.backend.decode(embedding, input_hw, (1024, 1024), batch)

        run()
        start, repeats = time.perf_counter(), 3
        for _ in range(repeats):
            run()
        per_prompt = (time.perf_counter() - start) / repeats / size
        print(f"batch {size:4d}: {1000 * per_prompt:.1f} ms per prompt")


if __name__ == "__main__":
    main()
