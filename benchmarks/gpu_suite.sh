#!/usr/bin/env bash
# Every GPU check of the project, one stage per device call (each fits the 10-minute limit).
#
# Here, once per session (builds .devkit/, ~52 MB: Ray, DeepSpeed, open_clip, python-multipart for
# Python 3.12; not boto3, which only s3:// paths import and which would take the kit past 64 MiB):
#     ../shared/device/make-kit python-multipart
# Then one device call per stage, carrying the kit:
#     run(command="bash benchmarks/gpu_suite.sh tests", carry=[".devkit"])   # tests/gpu: CUDA paths,
#                                                   # bf16 DeepSpeed on NCCL, ZeRO 0/1/2, resume
#     run(command="bash benchmarks/gpu_suite.sh train", carry=[".devkit"])   # issue 3: ViT-B-32 bf16
#                                                   # end to end vs the bare step (target >= 0.85)
#     run(command="bash benchmarks/gpu_suite.sh serve", carry=[".devkit"])   # issue 5: ViT-B-32 text
#                                                   # queries over a 100,000-image index, p50/p99
# Results (JSON, and each stage's log) go to $OUT when the device tool sets it, else benchmarks/results/.
# On any CUDA machine with the project installed, the same stages run without the kit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage="${1:?usage: benchmarks/gpu_suite.sh tests|train|serve}"
if [ -f .devkit/site.tar.xz ] && ! python3 -c "import ray" 2>/dev/null; then
    mkdir -p /tmp/site && tar xJf .devkit/site.tar.xz -C /tmp/site
    export PYTHONPATH="$PWD/platform:/tmp/site:${PYTHONPATH:-}"
fi
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export RAY_TMPDIR="${RAY_TMPDIR:-$(mktemp -d /tmp/hr-XXXX)}"
log="$out/gpu_$stage.txt"
logged() { "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }
: > "$log"
logged nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
logged python3 -c "import torch, ray, deepspeed, open_clip; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)" || exit 1
case "$stage" in
    tests) logged python3 -m pytest -q -p no:cacheprovider tests/gpu ;;
    train) logged python3 benchmarks/train_step.py --arch ViT-B-32 --precision bf16 --gpu --zero 0 1 2 --workers 1 \
               --images 6000 --epochs 2 --out "$out/train_step_h100.json" ;;
    serve) logged python3 benchmarks/serve_latency.py --arch ViT-B-32 --images 100000 --device cuda \
               --out "$out/serve_latency_h100.json" ;;
    *) echo "unknown stage $stage (tests|train|serve)" >&2; exit 2 ;;
esac
