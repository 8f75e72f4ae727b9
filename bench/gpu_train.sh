#!/usr/bin/env bash
# Training throughput on one GPU, for sizing the p4d job (run on an H100/A100 host).
#
#   bench/gpu_train.sh            # ~3 min; must finish in < 6 min
#   PYTHON=/path/to/python bench/gpu_train.sh
#
# Measures: resnet152 @224 px (12,000 classes, conv1..layer3 frozen) train-step images/s per
# GPU with AMP bf16 + channels_last on synthetic tensors (batch 128 and 256, plus an fp32/TF32
# baseline), the data loader's images/s with all CPU cores on generated 1024x768 JPEGs (with
# and without PIL draft()), and a short real train.py run (torchrun, 1 GPU) for the end-to-end
# number. Results also go to bench/out/gpu_train.json.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  # The project venv if it has a CUDA torch, else the host's python3 (a DLC / GPU image).
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
export PYTHONUNBUFFERED=1

echo "== host: $(hostname) | CPUs: $(nproc) | python: ${PYTHON}"
echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi not available)"
echo "== versions"
"${PYTHON}" - <<'PY'
import torch, torchvision, PIL
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) | "
      f"torchvision {torchvision.__version__} | Pillow {PIL.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
PY

mkdir -p bench/out
echo "== benchmark"
# The inner timeout keeps the whole script under 6 minutes even if something hangs.
timeout --signal=TERM --kill-after=20 330 "${PYTHON}" bench/train_bench.py \
  --device cuda --arch resnet152 --image-size 224 --num-classes 12000 --head-hidden 576 \
  --batch-size 128 --extra-batch-sizes 256 --amp bf16 --channels-last --fp32-baseline \
  --warmup 10 --steps 30 \
  --loader-images 3000 --loader-size 1024x768 --loader-workers "$(nproc)" --loader-passes 2 --no-draft-baseline \
  --e2e-steps 30 --e2e-timeout 180 \
  --json bench/out/gpu_train.json
