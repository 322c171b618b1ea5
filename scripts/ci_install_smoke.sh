#!/usr/bin/env bash
# Non-editable install smoke test (issue 12): the package must work outside the checkout, with the
# bundles and shared configs it ships as package data (medxfer/resources.py).
#
#   1. a fresh venv in a temporary folder: torch==2.13.0 first (the CPU wheel on local disk; a bare
#      torch pulls GBs of CUDA), then `pip install -c constraints.txt <checkout>` (NOT editable);
#   2. in an empty temporary folder: `medxfer demo --study quick` (smoke preset: numbers meaningless)
#      and `medxfer bank build` on tiny settings (one small UNet, one source task, one epoch);
#   3. checks: the outputs exist, the bundles resolve to the installed copy, defaults that would
#      write into the installed bundle are refused, and the installed files are left unchanged.
#
# Usage: bash scripts/ci_install_smoke.sh        (PYTHON=python3.x to choose the interpreter)
# Called by .ci/run after `make test`. Prints its wall time; keeps its folder when it fails.
set -euo pipefail

START=$SECONDS
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/medxfer-install-smoke.XXXXXX")"
finish() {
    local rc=$?
    if [ "$rc" -eq 0 ]; then
        rm -rf "$TMP"
        echo "ci_install_smoke: passed in $((SECONDS - START)) s"
    else
        echo "ci_install_smoke: FAILED (exit $rc) after $((SECONDS - START)) s; files kept in $TMP" >&2
    fi
}
trap finish EXIT
step() { echo "[install-smoke +$((SECONDS - START))s] $*"; }
fail() { echo "ci_install_smoke: $*" >&2; exit 1; }

# The checkout's files (tracked + untracked, not ignored) copied out, so the build neither sees
# ignored outputs (models/*.pt, bank/, runs/, a stale build/) nor writes build/ into the checkout.
step "copying the checkout's files to $TMP/src"
mkdir -p "$TMP/src" "$TMP/work"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$TMP/src"
else
    cp -r "$REPO/." "$TMP/src"
fi

step "fresh venv ($("$PY" --version 2>&1)), torch==2.13.0 first, then a non-editable install"
"$PY" -m venv "$TMP/venv"
BIN="$TMP/venv/bin"
"$BIN/python" -m pip install --quiet --upgrade pip
"$BIN/python" -m pip install --quiet torch==2.13.0
"$BIN/python" -m pip install --quiet -c "$REPO/constraints.txt" "$TMP/src"
rm -rf "$TMP/src"   # nothing may still read the source copy

cd "$TMP/work"
step "where the installed package finds its bundles and configs"
PKG="$("$BIN/python" - <<'EOF'
from medxfer import resources as r

root = r.package_root()
bundles, configs = r.bundles_root(), r.configs_root()
assert "site-packages" in root.parts, f"medxfer imported from {root}, not the installed copy"
assert bundles == root / "bundles" and configs == root / "configs", (bundles, configs)
assert r.bundle_names() == ["msd_seg3d", "seg2d_transfer", "tatl_skin", "transferability"], r.bundle_names()
for name in r.bundle_names():
    assert (r.bundle_path(name) / "configs" / "metadata.json").is_file(), name
    assert r.is_installed_copy(r.bundle_path(name)), name
assert r.config_path("bank_ccfv.yaml").is_file() and r.config_path("msd_tasks.yaml").is_file()
print(root)
EOF
)"
echo "  installed package: $PKG"
snapshot() { (cd "$PKG" && find bundles configs -print0 | sort -z | xargs -0 ls -ld --time-style=full-iso); }
BEFORE="$(snapshot)"

step "medxfer demo --study quick --out demo"
"$BIN/medxfer" demo --study quick --out demo
for f in demo/summary.json demo/check_report.json demo/study/te_evaluation.json demo/study/study.json \
         demo/study/bank/bank.yaml; do
    [ -s "$f" ] || fail "demo output $f missing or empty"
done

step "medxfer bank build on tiny settings (--config tiny_bank.yaml)"
mkdir bank_data
cp -r demo/data/msd/Task09_Spleen demo/data/msd/Task03_Liver bank_data/   # planned by the study
cat > tiny_bank.yaml <<'EOF'
# smoke-test bank: one small UNet, one epoch; the numbers mean nothing
archs:
  unet: {channels: [8, 16], strides: [2], num_res_units: 0}
patch_size: [16, 16, 16]
epochs: 1
optimizer: adamw
learning_rate: 0.003
n_folds: 2
same_channels_only: true
EOF
"$BIN/medxfer" bank build --data bank_data --target Task09_Spleen --out bank --config tiny_bank.yaml --device cpu
"$BIN/medxfer" bank list bank
"$BIN/python" - <<'EOF'
import yaml

entries = yaml.safe_load(open("bank/bank.yaml"))["entries"]
names = sorted(e["name"] for e in entries)
assert names == ["unet_Task03_Liver_e1", "unet_scratch"], names
print(f"  bank.yaml: {names}")
EOF

step "a workflow whose output_dir defaults into the installed bundle is refused"
"$BIN/python" - <<'EOF'
from medxfer.workflows.bundle import run_bundle

try:
    run_bundle("tatl_skin", ["tatl"], run=False)
except ValueError as e:
    assert "output_dir" in str(e) and "installed bundle" in str(e), e
    print(f"  refused: {e}")
else:
    raise SystemExit("run_bundle wrote its defaults into the installed bundle folder")
EOF

step "the installed bundles and configs are unchanged"
AFTER="$(snapshot)"
if [ "$BEFORE" != "$AFTER" ]; then
    diff <(echo "$BEFORE") <(echo "$AFTER") >&2 || true
    fail "something wrote into $PKG/bundles or $PKG/configs"
fi
