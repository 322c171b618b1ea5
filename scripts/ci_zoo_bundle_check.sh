#!/usr/bin/env bash
# An exported model-zoo bundle runs with MONAI only (issue 15): in a fresh venv holding torch and
# monai[nibabel,ignite,fire] and NOT medxfer, `python -m monai.bundle run --config_file
# configs/inference.json --dataset_dir D` must predict what medxfer's own inference predicts for
# the same model on the same cases (Dice 1.0 on every case; the label maps are compared exactly).
#
#   1. medxfer's venv (.venv of `make test`): generated spleen task, a 1-epoch UNet training run
#      (bundles/msd_seg3d train), `medxfer export-bundle --run`, medxfer's inference on imagesTs;
#   2. a fresh venv: torch==2.13.0 first, then monai[nibabel,ignite,fire] under constraints.txt;
#      `import medxfer` must fail there; the exported bundle's inference on the same images;
#   3. the two sets of predictions compared in medxfer's venv.
#
# Usage: bash scripts/ci_zoo_bundle_check.sh     (MEDXFER_PY=.venv/bin/python, PYTHON=python3.x)
# Called by .ci/run after the install smoke. Prints its wall time; keeps its folder when it fails.
set -euo pipefail

START=$SECONDS
REPO="$(cd "$(dirname "$0")/.." && pwd)"
MX="${MEDXFER_PY:-$REPO/.venv/bin/python}"
PY="${PYTHON:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/medxfer-zoo-check.XXXXXX")"
finish() {
    local rc=$?
    if [ "$rc" -eq 0 ]; then
        rm -rf "$TMP"
        echo "ci_zoo_bundle_check: passed in $((SECONDS - START)) s"
    else
        echo "ci_zoo_bundle_check: FAILED (exit $rc) after $((SECONDS - START)) s; files kept in $TMP" >&2
    fi
}
trap finish EXIT
step() { echo "[zoo-check +$((SECONDS - START))s] $*"; }
export OMP_NUM_THREADS=1 MPLCONFIGDIR="$TMP/cache/mpl" TORCH_HOME="$TMP/cache/torch" XDG_CACHE_HOME="$TMP/cache"
cd "$TMP"

step "generated task, a 1-epoch UNet run, export, medxfer's own inference"
"$MX" -m medxfer.cli synth msd --out data --profiles spleen --num-training 4 --num-test 2 --shape 32 32 12 \
    --spacing 9.6 9.6 24 >/dev/null
"$MX" -m monai.bundle run --config_file "$REPO/bundles/msd_seg3d/configs/train.yaml" \
    --bundle_root "$REPO/bundles/msd_seg3d" --data_root "$TMP/data/Task09_Spleen" --output_dir "$TMP/run" \
    --max_epochs 1 --n_folds 2 --device cpu --num_workers 0 \
    --arch_kwargs '{"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}' >run.log 2>&1 \
    || { tail -20 run.log >&2; exit 1; }
"$MX" -m medxfer.cli export-bundle --run "$TMP/run" --out "$TMP/zoo/spleen_unet" --name spleen_unet
"$MX" -m monai.bundle run --config_file "$REPO/bundles/msd_seg3d/configs/inference.yaml" \
    --bundle_root "$REPO/bundles/msd_seg3d" --model_dir "$TMP/run" --input_path "$TMP/data/Task09_Spleen" \
    --output_dir "$TMP/pred_medxfer" --device cpu >infer.log 2>&1 || { tail -20 infer.log >&2; exit 1; }

step "fresh venv with MONAI only ($("$PY" --version 2>&1))"
"$PY" -m venv "$TMP/venv"
BIN="$TMP/venv/bin"
"$BIN/python" -m pip install --quiet --upgrade pip
"$BIN/python" -m pip install --quiet torch==2.13.0
"$BIN/python" -m pip install --quiet -c "$REPO/constraints.txt" "monai[nibabel,ignite,fire]"
if "$BIN/python" -c "import medxfer" 2>/dev/null; then
    echo "ci_zoo_bundle_check: medxfer is importable in the MONAI-only venv" >&2
    exit 1
fi
"$BIN/python" -m monai.bundle run --config_file "$TMP/zoo/spleen_unet/configs/inference.json" \
    --bundle_root "$TMP/zoo/spleen_unet" --dataset_dir "$TMP/data/Task09_Spleen" --output_dir "$TMP/pred_zoo" \
    >zoo.log 2>&1 || { tail -20 zoo.log >&2; exit 1; }

step "predictions compared"
"$MX" - "$TMP/pred_medxfer" "$TMP/pred_zoo" <<'EOF'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ours, theirs = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(ours.glob("*_seg.nii.gz"))
assert files, f"no predictions in {ours}"
for f in files:
    a, b = nib.load(f), nib.load(theirs / f.name)
    x, y = np.asarray(a.dataobj), np.asarray(b.dataobj)
    labels = [v for v in np.union1d(np.unique(x), np.unique(y)) if v != 0]
    dice = [2 * np.sum((x == v) & (y == v)) / (np.sum(x == v) + np.sum(y == v)) for v in labels] or [1.0]
    assert np.array_equal(x, y) and np.allclose(a.affine, b.affine, atol=1e-5), (f.name, dice)
    print(f"  {f.name}: identical, Dice {min(dice):.4f}")
EOF
