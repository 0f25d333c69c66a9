#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call on a lent GPU machine (this workplace's `device` tool).
# That machine has PyTorch and JAX but no TensorFlow and no network: Keras, its two small dependencies
# and MONAI travel as wheels in .whl/ (BENCHMARKS.md says how they were fetched). Results go to $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/unet3d-gpu-bench}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD/UNet3DSegment" PYTHONUNBUFFERED=1
log="$OUT/log.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    KERAS_BACKEND=torch python3 -c "import torch, jax, keras, monai; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'jax', jax.__version__, 'keras', keras.__version__, 'monai', monai.__version__)"
} 2>&1 | tee "$log"
bench="python3 benchmarks/bench_inference.py --device gpu --peak-tflops 790 --repeats 20 --timeout 150"
step() { echo "== $*" | tee -a "$log"; timeout 300 $bench "$@" 2>&1 | tee -a "$log"; }
step --backend jax --variants engine-bf16,engine-fp32,monai-bf16 --json "$OUT/jax_b2.json"
step --backend jax --variants engine-bf16 --serial --json "$OUT/jax_b2_serial.json"
step --backend jax --batch-size 8 --variants engine-bf16,monai-bf16 --json "$OUT/jax_b8.json"
step --backend jax --blend-on device --variants engine-bf16 --json "$OUT/jax_b2_device.json"
step --backend jax --blend-on device --batch-size 8 --variants engine-bf16 --json "$OUT/jax_b8_device.json"
step --backend torch --variants engine-bf16,monai-bf16 --json "$OUT/torch_b2.json"
step --backend torch --blend-on device --batch-size 8 --variants engine-bf16 --json "$OUT/torch_b8_device.json"
step --backend torch --batch-size 8 --variants engine-bf16 --json "$OUT/torch_b8.json"
step --backend torch --oom-check --shape 96,96,96 --json "$OUT/oom.json"
UNET3D_JAX_FRACTION=0.003 step --backend jax --oom-check --shape 64,64,96 --batch-size 8 --json "$OUT/oom_jax.json"
