"""GPU check: encoder, decoder and encode + decode rates of MobileSAM and SAM ViT-B on CUDA.

Runs on a bare GPU machine with numpy and torch only (plus timm for MobileSAM's TinyViT,
with a fallback in the bundle): nothing of the geospatial or cluster stack is imported.
The model code (segment_anything, mobile_sam), the MobileSAM weights and a few real
Banepa tiles with their building boxes come from ``gpu_bundle/`` (made by
``benchmarks/gpu_bundle.sh``); ``benchmarks/gpu_check.sh`` is the one command to run
there. Measured, for ``mobile_sam`` (real weights) and ``vit_b`` (random weights: same
arithmetic, no checkpoint needed):

* image encoder alone, under autocast (``--precision``, default bf16), on model inputs
  already on the device: tiles/s and ms/tile at each encoder batch size, the best one,
  and fp32 at that batch size;
* mask decoder through ``SamBackend.decode`` (what a run calls) with ``--prompts`` box
  prompts per tile (64: ``GPU_BATCH_SIZE``, one decoder call): ms per tile and per
  prompt; and with each prompt's cells of the low-res logits (``masks.logits_windows``)
  copied to host memory, as a model host does before handing them to the finish stage;
* encode + decode: ``encode_many`` from uint8 arrays at the best batch size, then the
  box prompts of each tile: tiles/s, without and with the crops;
* bf16 against fp32 masks of MobileSAM on one tile (median IoU), mean predicted IoU;
* peak GPU memory per step (``torch.cuda.max_memory_allocated``); torch, CUDA, device.

Each timing has warm-up iterations and synchronizes the device around each iteration.
A global time guard (``--budget-s``) skips what is left when time runs short and says
so in ``skipped``. The JSON goes to ``--json`` (default ``$OUT/gpu_check.json``, else
``out/gpu_check.json``) and is printed on one line at the end; it is rewritten after
each model, so a run cut short still leaves what it measured.

    python benchmarks/gpu_check.py [--bundle gpu_bundle] [--budget-s 360] [--quick]
    python benchmarks/gpu_check.py --allow-cpu --quick --models mobile_sam   # try it on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GEO_STACK = ("ray", "rasterio", "geopandas", "shapely", "pyproj", "pyogrio", "fiona", "affine", "pandas", "pydantic")
MIB = 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "gpu_bundle",
                        help="folder made by benchmarks/gpu_bundle.sh (py/, tiles/, mobile_sam.pt)")
    parser.add_argument("--weights", type=Path, default=None, help="MobileSAM weights (default BUNDLE/mobile_sam.pt)")
    parser.add_argument("--tiles", type=Path, default=None, help="folder of *.npy tiles (default BUNDLE/tiles)")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (default $OUT/gpu_check.json)")
    parser.add_argument("--models", default="mobile_sam,vit_b")
    parser.add_argument("--batch-sizes", default=None, help="encoder batch sizes (default 1,2,4,8,16; quick 1,2)")
    parser.add_argument("--prompts", type=int, default=64, help="box prompts per tile")
    parser.add_argument("--decode-batch", type=int, default=64, help="prompts per decoder call (GPU_BATCH_SIZE)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--pipeline-tiles", type=int, default=None, help="tiles of the encode + decode runs")
    parser.add_argument("--budget-s", type=float, default=360.0, help="time guard: stop measuring after this")
    parser.add_argument("--quick", action="store_true", help="tiny counts (to try the script, e.g. on CPU)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU when CUDA is missing")
    return parser.parse_args()


def setup_path(bundle: Path) -> dict[str, Any]:
    """Put the repository and the bundled model code first on sys.path, and the bundled
    timm stand-in too where timm itself does not import."""
    sys.path[:0] = [str(bundle / "py"), str(ROOT)]
    info: dict[str, Any] = {"bundle": str(bundle), "bundle_found": (bundle / "py").is_dir()}
    try:
        import timm

        info["timm"] = getattr(timm, "__version__", "?")
    except ImportError as exc:  # not installed, or broken (timm imports torchvision)
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]  # submodules a failed import left behind
        sys.path.insert(0, str(bundle / "timm_fallback"))
        info["timm"] = f"not importable ({exc}): bundled stand-in used"
    return info


# --- timing ---------------------------------------------------------------------------------


class Guard:
    """The global time budget: measurements ask it before they start and cap their loops."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.skipped: list[dict[str, str]] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def allow(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append({"what": what, "reason": f"time guard: {self.left():.0f} s left of "
                                                     f"{self.budget_s:.0f} s, needs about {need_s:.0f} s"})
        log(f"SKIPPED {what}: time guard")
        return False

    def cap(self, wanted_s: float) -> float:
        return max(0.5, min(wanted_s, self.left() - 5.0))


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_timed(fn: Callable[[], Any], sync: Callable[[], None], *, warmup: int, iters: int, max_s: float) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls, synchronized;
    stops early (at least one timed call) once ``max_s`` seconds are spent."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_s:
            break
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(times), 6), "min_s": round(min(times), 6), "iters": len(times)}


# --- the check ------------------------------------------------------------------------------


class Check:
    """Holds the device, data and settings; one method per measurement."""

    def __init__(self, args: argparse.Namespace, torch: Any, np: Any, guard: Guard) -> None:
        self.args, self.torch, self.np, self.guard = args, torch, np, guard
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
        quick = args.quick
        self.sizes = [int(s) for s in (args.batch_sizes or ("1,2" if quick else "1,2,4,8,16")).split(",")]
        self.enc_warmup, self.enc_tiles = (1, 1) if quick else (2, 64)
        self.dec_warmup, self.dec_iters = (1, 2) if quick else (3, 24)
        self.pipe_tiles = args.pipeline_tiles or (2 if quick else 64)
        self.tiles, self.boxes, self.tile_names = self._load_tiles(args.tiles or args.bundle / "tiles")

    def _load_tiles(self, folder: Path) -> tuple[list[Any], list[Any], list[str]]:
        np = self.np
        paths = sorted(p for p in folder.glob("*.npy") if not p.name.endswith(".boxes.npy"))
        if not paths:
            raise SystemExit(f"no tiles in {folder}: run `bash benchmarks/gpu_bundle.sh` first")
        tiles, boxes = [], []
        for path in paths:
            rgb = np.load(path)
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise SystemExit(f"{path}: expected uint8 (rows, cols, 3), got {rgb.dtype} {rgb.shape}")
            box = np.load(path.with_suffix(".boxes.npy")).astype(np.float64)
            tiles.append(rgb)
            boxes.append(box[np.arange(self.args.prompts) % len(box)])  # repeat up to --prompts
        return tiles, boxes, [p.stem for p in paths]

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    @contextmanager
    def precision(self, dtype: Any = None) -> Iterator[None]:
        dtype = dtype or self.dtype
        with self.torch.inference_mode(), self.torch.autocast(
            device_type=self.device.type, dtype=dtype, enabled=dtype != self.torch.float32
        ):
            yield

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated(self.device) / MIB, 1) if self.cuda else None

    def prompt_batch(self, k: int) -> Any:
        from sam_geo.io.prompt_batch import PromptBatch

        np, n = self.np, self.args.prompts
        return PromptBatch(np.arange(n), self.boxes[k], np.zeros((n, 0, 2)), np.zeros((n, 0), np.int32))

    # -- measurements ---------------------------------------------------------------------
    def encoder(self, backend: Any, name: str) -> dict[str, Any]:
        """Image encoder alone on model inputs already on the device, by batch size."""
        torch, model = self.torch, backend.model
        with torch.inference_mode():
            inputs = torch.cat([model.preprocess(torch.as_tensor(t, device=self.device).permute(2, 0, 1)[None].float())
                                for t in self.tiles])
        by_batch: dict[str, Any] = {}
        for size in self.sizes:
            what = f"{name} encoder batch {size}"
            if not self.guard.allow(what, 10.0):
                break
            x = inputs[torch.arange(size) % len(self.tiles)]
            iters = max(3, -(-self.enc_tiles // size)) if not self.args.quick else 1
            try:
                by_batch[str(size)] = self._encode_rate(model, x, size, iters)
            except torch.cuda.OutOfMemoryError as exc:
                by_batch[str(size)] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
                torch.cuda.empty_cache()
                break
            log(f"{what}: {by_batch[str(size)]['ms_per_tile']} ms/tile")
        rates = {int(k): v["tiles_per_s"] for k, v in by_batch.items() if "tiles_per_s" in v}
        out: dict[str, Any] = {"precision": self.args.precision, "by_batch": by_batch}
        if rates:
            best = max(rates, key=rates.get)
            out.update(best_batch=best, best_tiles_per_s=rates[best], best_ms_per_tile=by_batch[str(best)]["ms_per_tile"])
            if self.dtype != torch.float32 and self.guard.allow(f"{name} encoder fp32 batch {best}", 15.0):
                x = inputs[torch.arange(best) % len(self.tiles)]
                out["fp32_at_best_batch"] = self._encode_rate(model, x, best, 3 if not self.args.quick else 1,
                                                              torch.float32)
                log(f"{name} encoder fp32 batch {best}: {out['fp32_at_best_batch']['ms_per_tile']} ms/tile")
        return out

    def _encode_rate(self, model: Any, x: Any, size: int, iters: int, dtype: Any = None) -> dict[str, Any]:
        def call() -> None:
            with self.precision(dtype):
                model.image_encoder(x)

        self.reset_peak()
        times = run_timed(call, self.sync, warmup=self.enc_warmup, iters=iters, max_s=self.guard.cap(20.0))
        med = statistics.median(times)
        return {**summary(times), "tiles_per_s": round(size / med, 2), "ms_per_tile": round(1000 * med / size, 3),
                "peak_mem_mib": self.peak_mib()}

    def embeddings(self, backend: Any, dtype: Any = None, count: int | None = None) -> list[Any]:
        """``encode_many`` of each tile (the first ``count``), one at a time."""
        with self.precision(dtype):
            out = [backend.encode_many([t])[0] for t in self.tiles[:count]]
        self.sync()
        return out

    def decode_tile(self, backend: Any, k: int, embedding: Any, input_hw: Any, crops: bool) -> list[Any]:
        """The box prompts of tile ``k`` through ``SamBackend.decode`` in decoder calls of
        ``--decode-batch``; with ``crops``, each prompt's logits window copied to the host
        (what ``ModelHost.decode_prompts`` sends to the finish stage)."""
        from sam_geo.model.masks import logits_windows

        np, batch = self.np, self.prompt_batch(k)
        tile_hw = self.tiles[k].shape[:2]
        out = []
        for start in range(0, len(batch), self.args.decode_batch):
            part = batch.take(np.arange(start, min(start + self.args.decode_batch, len(batch))))
            with self.precision():
                logits, scores = backend.decode(embedding, input_hw, tile_hw, part)
            if crops:
                frame = backend.logits_frame(tile_hw, input_hw)
                windows = logits_windows(part, tile_hw, frame, size=int(logits.shape[-1]))
                host = logits.float().cpu()
                out += [host[j, a0:a1, b0:b1].numpy().copy() for j, (a0, b0, a1, b1) in enumerate(windows.tolist())]
            else:
                out.append((logits, scores))
        return out

    def decoder(self, backend: Any, name: str) -> dict[str, Any]:
        n, torch = self.args.prompts, self.torch
        embeddings = self.embeddings(backend)
        out: dict[str, Any] = {"prompts_per_tile": n, "decode_batch": self.args.decode_batch, "precision": self.args.precision}
        for crops in (False, True):
            key = "with_crops" if crops else "decode"
            if not self.guard.allow(f"{name} decoder ({key})", 10.0):
                continue
            turn = iter(range(10**9))

            def call() -> None:
                k = next(turn) % len(self.tiles)
                self.decode_tile(backend, k, *embeddings[k], crops)

            self.reset_peak()
            times = run_timed(call, self.sync, warmup=self.dec_warmup, iters=self.dec_iters, max_s=self.guard.cap(20.0))
            med = statistics.median(times)
            out[key] = {**summary(times), "ms_per_tile": round(1000 * med, 3), "ms_per_prompt": round(1000 * med / n, 4),
                        "peak_mem_mib": self.peak_mib()}
            log(f"{name} decoder {key}: {out[key]['ms_per_tile']} ms per tile of {n} boxes")
        parts = self.decode_tile(backend, 0, *embeddings[0], False)
        scores = self.np.concatenate([s for _, s in parts])
        logits = torch.cat([l for l, _ in parts])
        out["tile0_mean_score"] = round(float(scores.mean()), 4)
        out["tile0_mean_mask_cells"] = round(float((logits > 0).sum(dim=(-1, -2)).float().mean()), 1)
        return out

    def agreement(self, backend: Any) -> dict[str, Any]:
        """Masks of tile 0 under ``--precision`` against fp32 (encode and decode)."""
        torch, np = self.torch, self.np
        if self.dtype == torch.float32 or not self.guard.allow("bf16 vs fp32 agreement", 10.0):
            return {}
        masks = {}
        for label, dtype in (("low", self.dtype), ("fp32", torch.float32)):
            embedding, input_hw = self.embeddings(backend, dtype, count=1)[0]
            with self.precision(dtype):
                logits, _ = backend.decode(embedding, input_hw, self.tiles[0].shape[:2], self.prompt_batch(0))
            masks[label] = (logits > 0).cpu().numpy()
        inter = (masks["low"] & masks["fp32"]).sum(axis=(1, 2))
        union = np.maximum((masks["low"] | masks["fp32"]).sum(axis=(1, 2)), 1)
        iou = inter / union
        return {"median_mask_iou": round(float(np.median(iou)), 4), "min_mask_iou": round(float(iou.min()), 4),
                "prompts": int(len(iou))}

    def pipeline(self, backend: Any, name: str, batch: int) -> dict[str, Any]:
        """encode_many at ``batch`` tiles per call from uint8 arrays, then each tile's boxes;
        ``--pipeline-tiles`` tiles, fewer if the warm-up says they would take over 30 s."""
        out: dict[str, Any] = {"encode_batch": batch, "prompts_per_tile": self.args.prompts}
        order = [i % len(self.tiles) for i in range(self.pipe_tiles)]
        for crops in (False, True):
            key = "with_crops" if crops else "encode_decode"
            if not self.guard.allow(f"{name} encode + decode ({key})", 15.0):
                continue

            def run(indices: list[int]) -> None:
                for start in range(0, len(indices), batch):
                    chunk = indices[start : start + batch]
                    with self.precision():
                        encoded = self.backend_encode(backend, chunk)
                    for k, (embedding, input_hw) in zip(chunk, encoded):
                        self.decode_tile(backend, k, embedding, input_hw, crops)

            start = time.perf_counter()
            run(order[:batch])  # warm-up: one encoder batch and its decodes
            self.sync()
            per_tile = (time.perf_counter() - start) / batch  # over-estimate: first calls are slower
            tiles = order[: max(batch, min(len(order), int(self.guard.cap(30.0) / per_tile)))]
            self.reset_peak()
            start = time.perf_counter()
            run(tiles)
            self.sync()
            spent = time.perf_counter() - start
            out[key] = {"tiles": len(tiles), "seconds": round(spent, 4), "tiles_per_s": round(len(tiles) / spent, 3),
                        "ms_per_tile": round(1000 * spent / len(tiles), 3), "peak_mem_mib": self.peak_mib()}
            log(f"{name} encode + decode ({key}): {out[key]['tiles_per_s']} tiles/s")
        return out

    def backend_encode(self, backend: Any, chunk: list[int]) -> list[Any]:
        return backend.encode_many([self.tiles[k] for k in chunk])


# --- per model and the whole run --------------------------------------------------------------


def check_model(check: Check, name: str, weights: Path | None) -> dict[str, Any]:
    from sam_geo.model.sam_backend import build_backend

    torch = check.torch
    if check.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(check.device)
    t0 = time.perf_counter()
    backend = build_backend(name, weights, check.device)
    if not check.cuda:  # as a CPU model host does
        backend.use_cpu_decoder(check.dtype)
    check.sync()
    result: dict[str, Any] = {
        "weights": str(weights) if weights else "random (no checkpoint: same arithmetic)",
        "params_m": round(sum(p.numel() for p in backend.model.parameters()) / 1e6, 2),
        "build_s": round(time.perf_counter() - t0, 2),
    }
    log(f"{name}: built in {result['build_s']} s ({result['params_m']} M parameters)")
    result["encoder"] = check.encoder(backend, name)
    result["decoder"] = check.decoder(backend, name)
    if weights is not None:
        result["agreement_vs_fp32"] = check.agreement(backend)
    best = result["encoder"].get("best_batch")
    if best:
        result["pipeline"] = check.pipeline(backend, name, best)
    result["peak_mem_mib"] = check.peak_mib()
    del backend
    if check.cuda:
        torch.cuda.empty_cache()
    return result


def environment(torch: Any, np: Any, device: Any, path_info: dict[str, Any]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device), "host": platform.node(), "cpu_count": os.cpu_count(), **path_info,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "absent_packages": [m for m in GEO_STACK if importlib.util.find_spec(m) is None],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   device_memory_gib=round(props.total_memory / 1024**3, 1), bf16_supported=torch.cuda.is_bf16_supported())
    return env


def write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    args = parse_args()
    guard = Guard(args.budget_s)
    path_info = setup_path(args.bundle)
    import numpy as np
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              f"this check needs a GPU. Pass --allow-cpu (with --quick) to try it on CPU.", file=sys.stderr)
        return 2
    out_path = args.json or Path(os.environ.get("OUT") or ROOT / "out") / "gpu_check.json"
    weights = args.weights or args.bundle / "mobile_sam.pt"
    check = Check(args, torch, np, guard)
    result: dict[str, Any] = {
        "ok": False, "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": environment(torch, np, check.device, path_info),
        "config": {"models": args.models, "batch_sizes": check.sizes, "prompts_per_tile": args.prompts,
                   "precision": args.precision, "tiles": check.tile_names, "quick": args.quick, "budget_s": args.budget_s},
        "models": {}, "errors": [], "skipped": guard.skipped,
    }
    log(f"device {check.device}, {len(check.tiles)} tiles, models {args.models}, budget {args.budget_s:.0f} s")
    for name in args.models.split(","):
        if not guard.allow(f"model {name}", 30.0):
            continue
        model_weights = weights if name == "mobile_sam" else None
        if model_weights is not None and not model_weights.is_file():
            result["errors"].append(f"{name}: weights {model_weights} not found (run benchmarks/gpu_bundle.sh)")
            continue
        try:
            result["models"][name] = check_model(check, name, model_weights)
        except Exception as exc:  # record and go on with the next model
            result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            log(f"ERROR {name}: {type(exc).__name__}: {exc}")
        result["elapsed_s"] = round(time.monotonic() - guard.start, 1)
        write(result, out_path)
    result["loaded_geo_stack"] = sorted({m.split(".")[0] for m in sys.modules} & set(GEO_STACK))
    result["model_code"] = {m: getattr(sys.modules.get(m), "__file__", None) for m in ("segment_anything", "mobile_sam", "timm")}
    result["elapsed_s"] = round(time.monotonic() - guard.start, 1)
    result["ok"] = not result["errors"] and bool(result["models"])
    result["complete"] = result["ok"] and not guard.skipped  # ok and nothing skipped by the time guard
    write(result, out_path)
    print(json.dumps(result, separators=(",", ":")))  # one line: the device tool returns only the output's tail
    log(f"wrote {out_path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
