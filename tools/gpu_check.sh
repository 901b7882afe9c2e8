#!/bin/bash
# The GPU checks of docs/reconstruct.md ("On a GPU"): the gpu test tier, the torch tier on
# CUDA, and MGRQ timed on CUDA and on the machine's CPUs (CUDA_VISIBLE_DEVICES=) for
# mobilevitv2_050 W4 and the PP-OCR recognizer W4A8. Run from the repository root on a
# machine with an NVIDIA GPU, onnxquant installed (pip install -e '.[test,torch]'):
#
#     bash tools/gpu_check.sh [STAGE ...]      stages: tests torchtier mgrq (default: all)
#
# ASSETS (default ../shared/assets), OUT (default gpu_check/) and LINES (a folder of
# calibration lines; default: 64 written by tools/ocr_eval.py --write-calib-images, seed 1002)
# may be set. The log is $OUT/log.txt; the quantized files are in $OUT.
set -u
ASSETS=${ASSETS:-../shared/assets}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ONNXQUANT_ASSETS=$ASSETS
exec > >(tee -a "$OUT/log.txt") 2>&1
TIMEFORMAT='real %R s'
start=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - start )) s: $*"; }
python3 -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "torch sees no CUDA device: these checks need an NVIDIA GPU"; exit 2; }
nvidia-smi -L

R=$ASSETS/reference
W4="--weight-bits 4 --weight-symmetric --reconstruct mgrq"
W4A8="--target tensorrt --weight-bits 4 --act-bits 8 --reconstruct mgrq"
quantize() {  # NAME ARGS...: timed, quiet, once on CUDA and once on the CPUs
  local name=$1; shift
  stamp "$name on cuda"; time onnxquant "$@" "$OUT/$name.cuda.onnx" -q
  stamp "$name on cpu"; time CUDA_VISIBLE_DEVICES= onnxquant "$@" "$OUT/$name.cpu.onnx" -q
  cmp -s "$OUT/$name.cuda.onnx" "$OUT/$name.cpu.onnx" && echo "$name: same bytes on cuda and cpu"
}

for stage in ${@:-tests torchtier mgrq}; do
  case $stage in
  tests)
    stamp "gpu tier"
    python3 -m pytest -q -ra tests/test_gpu_kernel.py tests/test_gpu_torch.py;;
  torchtier)
    stamp "torch tier on cuda"
    python3 -m pytest -q -ra -m "torch and not accuracy" tests/test_reconstruct_torch.py \
      tests/test_reconstruct_driver.py tests/test_wild_inputs.py;;
  mgrq)
    quantize v2_050.W4.mgrq "$R/mobilevitv2_050.imagenette.onnx" --calib \
      "$ASSETS/imagenette/train" --preprocess-json "$R/mobilevitv2_050.imagenette.json" $W4
    LINES=${LINES:-$OUT/lines}
    [ -d "$LINES" ] || python3 tools/ocr_eval.py --lines 0 --write-calib-images "$LINES" \
      --calib-seed 1002 --calib-lines 64
    quantize rec.W4A8.mgrq "$ASSETS/real/PP-OCRv6_rec_small.onnx" --calib "$LINES" \
      --interpolation bilinear --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --channel-order bgr $W4A8;;
  *) echo "unknown stage $stage (tests, torchtier, mgrq)"; exit 2;;
  esac
done
stamp done
