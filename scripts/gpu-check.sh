#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU (a few minutes after the build):
#   1. the parity tests on `cuda` (every family against Python transformers, within 1e-4);
#   2. the Amazon MiniLM pipeline (pipelines/reviews-minilm.yaml) with `device: cuda`;
#   3. the step bench on `cuda` at batch 32 x 128 against PyTorch CUDA on the same batch.
# Needs: the NVIDIA driver (libcuda.so) and NVRTC, CUDA's runtime compiler: the machine's CUDA
# toolkit, or PyPI's nvidia-cuda-nvrtc-cu12 wheel (which PyTorch's CUDA wheels install too);
# the script puts a wheel's lib/ on LD_LIBRARY_PATH. PyTorch and transformers for step 3 come
# from $HF_PYTHON, else from a venv it makes with pip (target/gpu-python); without them the
# step runs against no reference and says so.
# GPU_CHECK_DEVICE (default cuda) and GPU_CHECK_FEATURES (default cuda) run the same steps
# elsewhere: `GPU_CHECK_DEVICE=cpu-generic GPU_CHECK_FEATURES= scripts/gpu-check.sh` on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${GPU_CHECK_DEVICE:-cuda}"
features="${GPU_CHECK_FEATURES-cuda}"
model_features="${features:+--features finetune-model/$features}"
features="${features:+--features $features}"
export FINETUNE_MODEL_DIR="${FINETUNE_MODEL_DIR:-$PWD/models/all-MiniLM-L6-v2}"
[ -f "$FINETUNE_MODEL_DIR/model.safetensors" ] || scripts/fetch-model.sh
# The bench's token ids ship with the tests.
export FINETUNE_SHARED="${FINETUNE_SHARED:-$PWD/tests/fixtures}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [ -z "${HF_PYTHON:-}" ]; then
    venv=target/gpu-python
    if [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" &&
        "$venv/bin/pip" install --quiet torch transformers nvidia-cuda-nvrtc-cu12; }; then
        HF_PYTHON="$PWD/$venv/bin/python"
    else
        echo "gpu-check: no PyTorch (pip failed): step 3 runs without the reference" >&2
    fi
fi
if [ -n "${HF_PYTHON:-}" ]; then
    export HF_PYTHON
    nvrtc="$("$HF_PYTHON" -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))' 2>/dev/null || true)"
    [ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$nvrtc:${LD_LIBRARY_PATH:-}"
fi

echo "== 1. parity on $device"
# shellcheck disable=SC2086 # $features is one flag and its value, or nothing
FINETUNE_TEST_DEVICE="$device" cargo test --release $features -p finetune-model --test parity \
    -- --nocapture --test-threads 1 2>&1 | grep -E "^on |max \||test result|panicked"

echo "== 2. the Amazon MiniLM pipeline on $device"
# shellcheck disable=SC2086
cargo build --release $features --bin finetune
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r data pipelines "$work/"
# Its train stage evaluates on the test split at the end (eval_split: test).
sed -i "s|^      model: { from|      device: $device\n      model: { from|" "$work/pipelines/reviews-minilm.yaml"
[ "$(grep -c "device: $device" "$work/pipelines/reviews-minilm.yaml")" = 1 ]
started=$(date +%s)
(cd "$work" && "$OLDPWD/target/release/finetune" run pipelines/reviews-minilm.yaml)
echo "wall time: $(( $(date +%s) - started )) s"
python3 - "$work" <<'PY'
import json, glob, sys
train = glob.glob(f"{sys.argv[1]}/artifacts/runs/reviews-minilm/train")[0]
metrics = json.load(open(f"{train}/metrics.json"))["test"]
device = json.load(open(f"{train}/run_history.json"))["device"]
print(f"device {device}; test accuracy {metrics['accuracy']:.4f} (goal >= 0.90), macro F1 {metrics['f1_macro']:.4f}")
PY

echo "== 3. the step bench on $device, batch 32 x 128"
# shellcheck disable=SC2086
FINETUNE_BENCH_DEVICE="$device" FINETUNE_BENCH_BATCH=32 FINETUNE_BENCH_TOKENS=128 \
    cargo bench -p finetune-trainer $model_features --bench step
