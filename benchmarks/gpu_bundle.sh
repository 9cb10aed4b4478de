#!/usr/bin/env bash
# Prepare gpu_bundle/ (git-ignored) for benchmarks/gpu_check.sh on a lent GPU machine.
#
# That machine has Python, numpy, torch, timm (and maybe pytest) but no package index,
# none of the geospatial stack, and probably neither segment_anything nor mobile_sam.
# A call carries at most 64 MiB (working tree plus carried paths), so the bundle holds
# only what the model layer needs:
#
#   gpu_bundle/py/segment_anything/   build_sam.py + modeling/ of the installed package, with
#                                     a slim __init__.py (the original imports the predictor
#                                     and mask generator, which need torchvision)
#   gpu_bundle/py/mobile_sam/         modeling/ of the installed mobilesam-mirror, slim
#                                     __init__.py (TinyViT is all sam_geo takes from it)
#   gpu_bundle/timm_fallback/timm/    the four names TinyViT imports from timm, put on the
#                                     path only where `import timm` fails
#   gpu_bundle/mobile_sam.pt          the real MobileSAM weights (39 MiB)
#   gpu_bundle/tiles/*.npy            N real Banepa tiles, uint8 (1024, 1024, 3), fully valid,
#                                     where most buildings are; *.boxes.npy beside each:
#                                     float32 (64, 4) pixel boxes x0, y0, x1, y1 of the
#                                     reference buildings in that tile, repeated up to 64
#   gpu_bundle/tiles/manifest.json    windows, real box counts, provenance
#
# Usage (from the repository root, on this machine, with the project's venv):
#     bash benchmarks/gpu_bundle.sh [N_TILES]      # default 4 tiles (3 MiB each)
# Then see benchmarks/gpu_check.sh for the device call. The script prints the size of
# what a call would carry and fails if it is over 64 MiB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
N_TILES="${1:-4}"
SHARED="${SAM_GEO_SHARED:-$ROOT/../shared}"
WEIGHTS="${SAM_GEO_WEIGHTS:-$SHARED/weights/mobile_sam.pt}"
SCENE="$SHARED/data/banepa/banepa_utm45n.tif"
BUILDINGS="$SHARED/data/banepa/buildings_utm45n.geojson"
OUT="$ROOT/gpu_bundle"
LIMIT_MIB=64

rm -rf "$OUT"
mkdir -p "$OUT/py" "$OUT/tiles" "$OUT/timm_fallback/timm/models"

# --- model code: the pure-python modeling parts of the installed packages ----------
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
copy_tree() {  # copy_tree SRC DEST: a package folder without caches
    mkdir -p "$2"
    (cd "$1" && find . -name '*.py' -not -path '*/__pycache__/*' -print0 | while IFS= read -r -d '' f; do
        mkdir -p "$2/$(dirname "$f")"; cp "$f" "$2/$f"; done)
}
copy_tree "$SITE/segment_anything/modeling" "$OUT/py/segment_anything/modeling"
cp "$SITE/segment_anything/build_sam.py" "$OUT/py/segment_anything/"
cat > "$OUT/py/segment_anything/__init__.py" <<'EOF'
"""segment_anything's model code only (copied by benchmarks/gpu_bundle.sh): build_sam and
modeling. The predictor and mask generator are left out; they need torchvision."""

from .build_sam import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry
EOF
copy_tree "$SITE/mobile_sam/modeling" "$OUT/py/mobile_sam/modeling"
cat > "$OUT/py/mobile_sam/__init__.py" <<'EOF'
"""MobileSAM's modeling package only (copied by benchmarks/gpu_bundle.sh): sam_geo takes
TinyViT from mobile_sam.modeling.tiny_vit_sam; the rest needs torchvision."""
EOF
for dist in segment_anything mobilesam_mirror; do  # keep the licences with the code
    lic="$(find "$SITE"/${dist}-*.dist-info -iname "LICENSE*" -type f 2>/dev/null | head -1 || true)"
    if [[ -n "$lic" ]]; then cp "$lic" "$OUT/py/LICENSE.$dist"; fi
done

# --- timm fallback: only used where `import timm` fails ------------------------------
cat > "$OUT/timm_fallback/timm/__init__.py" <<'EOF'
"""Stand-in for timm with the names MobileSAM's TinyViT imports (benchmarks/gpu_bundle.sh).
On the path only where the real timm cannot be imported."""
EOF
cat > "$OUT/timm_fallback/timm/models/__init__.py" <<'EOF'
EOF
cat > "$OUT/timm_fallback/timm/models/layers.py" <<'EOF'
import collections.abc

import torch
from torch import nn
from torch.nn.init import trunc_normal_  # noqa: F401  (same signature as timm's)


def to_2tuple(x):
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with drop_prob 0)."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)
EOF
cat > "$OUT/timm_fallback/timm/models/registry.py" <<'EOF'
def register_model(fn):
    return fn
EOF

# --- weights ------------------------------------------------------------------------
cp "$WEIGHTS" "$OUT/mobile_sam.pt"

# --- real tiles and their building boxes (needs rasterio + geopandas: this machine) ---
"$PY" - "$SCENE" "$BUILDINGS" "$OUT/tiles" "$N_TILES" <<'EOF'
import json
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.windows import Window

scene, buildings, out, n_tiles = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
SIZE, STRIDE, PROMPTS = 1024, 256, 64
with rasterio.open(scene) as ds:
    layer = gpd.read_file(buildings).to_crs(ds.crs)
    inverse = ~ds.transform
    bounds = layer.geometry.bounds.to_numpy()  # minx, miny, maxx, maxy in CRS units
    cols0, rows0 = inverse * (bounds[:, 0], bounds[:, 3])
    cols1, rows1 = inverse * (bounds[:, 2], bounds[:, 1])
    boxes = np.stack([cols0, rows0, cols1, rows1], axis=1)  # scene pixels x0, y0, x1, y1
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    valid = ds.dataset_mask()  # 0 where nodata
    candidates = []
    for row in range(0, ds.height - SIZE + 1, STRIDE):
        for col in range(0, ds.width - SIZE + 1, STRIDE):
            if valid[row : row + SIZE, col : col + SIZE].min() == 0:
                continue
            inside = ((centres[:, 0] >= col) & (centres[:, 0] < col + SIZE)
                      & (centres[:, 1] >= row) & (centres[:, 1] < row + SIZE))
            candidates.append((int(inside.sum()), row, col))
    candidates.sort(reverse=True)
    chosen = []
    for count, row, col in candidates:  # greedy: densest windows that do not overlap
        if all(abs(row - r) >= SIZE or abs(col - c) >= SIZE for _, r, c in chosen):
            chosen.append((count, row, col))
        if len(chosen) == n_tiles:
            break
    manifest = {"scene": Path(scene).name, "buildings": Path(buildings).name, "size": SIZE,
                "prompts_per_tile": PROMPTS, "tiles": []}
    for count, row, col in chosen:
        rgb = ds.read((1, 2, 3), window=Window(col, row, SIZE, SIZE)).transpose(1, 2, 0)
        inside = ((centres[:, 0] >= col) & (centres[:, 0] < col + SIZE)
                  & (centres[:, 1] >= row) & (centres[:, 1] < row + SIZE))
        tile_boxes = boxes[inside] - [col, row, col, row]
        tile_boxes = np.clip(tile_boxes, 0, SIZE)
        order = np.argsort(-(tile_boxes[:, 2] - tile_boxes[:, 0]) * (tile_boxes[:, 3] - tile_boxes[:, 1]), kind="stable")
        real = tile_boxes[order][:PROMPTS]
        padded = real[np.arange(PROMPTS) % len(real)].astype(np.float32)  # repeat up to 64
        name = f"banepa_r{row:04d}_c{col:04d}"
        np.save(out / f"{name}.npy", np.ascontiguousarray(rgb, dtype=np.uint8))
        np.save(out / f"{name}.boxes.npy", padded)
        manifest["tiles"].append({"name": name, "row": row, "col": col, "buildings": count,
                                  "real_boxes": int(len(real))})
        print(f"tile {name}: {count} buildings, {len(real)} real boxes (padded to {PROMPTS})")
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
EOF

# --- size of what one device call carries -------------------------------------------
tree_kib="$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 -r du -k --apparent-size 2>/dev/null | awk '{s += $1} END {print s + 0}')"
bundle_kib="$(du -sk --apparent-size "$OUT" | cut -f1)"
total_kib=$((tree_kib + bundle_kib))
awk -v b="$bundle_kib" -v t="$tree_kib" -v l="$LIMIT_MIB" 'BEGIN {
    printf "bundle %.1f MiB + working tree %.1f MiB = %.1f MiB carried (limit %d MiB)\n", b / 1024, t / 1024, (b + t) / 1024, l }'
if ((total_kib > LIMIT_MIB * 1024)); then
    echo "too large for one device call: use fewer tiles (bash benchmarks/gpu_bundle.sh 2)" >&2
    exit 1
fi
