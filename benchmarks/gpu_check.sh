#!/usr/bin/env bash
# The GPU check: one prepared script for a lent H100/H200 that finishes within 8 minutes and leaves
# its logs and tables in OUTDIR (7 files: the device tool brings back at most 8).
#
#   benchmarks/gpu_check.sh --prepare           # here, on the development machine: .whl/ and .gpu-data/
#   benchmarks/gpu_check.sh OUTDIR              # there, from the repository root
#   benchmarks/gpu_check.sh --dry-run [OUTDIR]  # on the CPU with the tiny model, every step, under a minute
#
# Through the device tool, after --prepare:
#   run(command="benchmarks/gpu_check.sh $OUT", carry=[".whl", ".gpu-data"], timeout_s=540)
#
# Steps (seconds since the start in every log line):
#   1. install the carried wheels (deepspeed, datasets, ...: the GPU machine lacks them) into /tmp/site
#   2. JIT-build DeepSpeed's FusedAdam in the background while the quick CUDA tests run
#      (tests/test_unpadded.py and tests/test_plan.py, marked gpu)
#   3. the MFU table of BERT-large (benchmarks/gpu_bert_large.py: SQuAD seq 384 and pretraining
#      seq 128, bf16, unpadded and padded, single_node and ZeRO-2, largest micro batch that fits)
#      and a torch.profiler summary of 5 steps (top kernels, idle gaps between kernels)
#   4. the other tests marked gpu (tests/test_gpu.py) in the time that is left
# OUTDIR: gpu_check.log (all of it), env.txt, tests.log, mfu_table.md, mfu.json, profile.txt,
# gpu_bert_large.log (every attempt's output).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds; the device tool's call is given 540
START=$(date +%s)
MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry; shift ;;
  ""|-h|--help) sed -n '2,23p' "$0"; exit 2 ;;
esac

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_check $(elapsed)s] $*"; }
left() { echo $((BUDGET - $(elapsed))); }

prepare() {
  # Wheels the GPU machine lacks, built here (../shared/tools/gpu-wheels.sh), and the data the check
  # reads, laid out as ../shared is (tests/conftest.py reads BERTSCALE_SHARED), about 20 MB.
  # (.gitignore holds /.whl/ and /.gpu-data/; gpu-wheels.sh also writes .git/info/exclude, which a
  # git worktree does not have: prepare in a plain clone.)
  PATH="$ROOT/.venv/bin:$PATH" bash ../shared/tools/gpu-wheels.sh || { log "gpu-wheels.sh failed"; exit 1; }
  local d=.gpu-data/data
  mkdir -p $d/squad $d/vocab $d/corpus/wikitext-2-raw
  cp ../shared/data/squad/{train-v1.1-first44.json,dev-v1.1-part1.json} $d/squad/
  gzip -c ../shared/data/squad/train-v1.1-reconstructed.json > $d/squad/train-v1.1-reconstructed.json.gz
  cp ../shared/data/vocab/bert-base-cased-vocab.txt $d/vocab/
  cp ../shared/data/corpus/wikitext-2-raw/wiki.test.raw $d/corpus/wikitext-2-raw/
  du -sh .whl .gpu-data
}

if [ "$MODE" = prepare ]; then prepare; exit; fi

OUT=${1:-}
if [ -z "$OUT" ]; then
  [ "$MODE" = dry ] || { echo "usage: $0 OUTDIR | --dry-run [OUTDIR] | --prepare" >&2; exit 2; }
  OUT=$(mktemp -d /tmp/gpu-check-dry-XXXX)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if [ "$MODE" = dry ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  export DS_ACCELERATOR=cpu
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(dirname "$(dirname "$PY")")/torch_extensions}
  DATA=${GPU_CHECK_DATA:-$ROOT/../shared/data}
  BENCH=(--dry-run)
  log "dry run on the CPU (tiny model, tiny sizes) with $PY; OUTDIR $OUT"
else
  PY=python3
  log "installing the carried wheels"
  ls .whl/*.whl >/dev/null || { log "no .whl/: run benchmarks/gpu_check.sh --prepare here and carry .whl"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # DeepSpeed 0.19.8 cannot parse the default 9.0a
  export BERTSCALE_SHARED=$ROOT/.gpu-data
  DATA=$ROOT/.gpu-data/data
  BENCH=()
fi

{
  date -u; uname -a; nvidia-smi 2>&1 | head -15
  $PY -c 'import torch, transformers, deepspeed, datasets; print("torch", torch.__version__, "cuda", torch.version.cuda,
"| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__, "| datasets", datasets.__version__)'
} > "$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"

JIT_PID=
if [ "$MODE" = gpu ]; then
  log "building DeepSpeed's FusedAdam (CUDA JIT) in the background"
  $PY -c 'from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()' > "$OUT/jit.tmp" 2>&1 &
  JIT_PID=$!
fi

log "quick CUDA tests: tests/test_unpadded.py tests/test_plan.py -m gpu"
timeout $(($(left) > 120 ? 120 : $(left))) $PY -m pytest -q -ra -m gpu -p no:cacheprovider \
  tests/test_unpadded.py tests/test_plan.py 2>&1 | tee -a "$OUT/tests.log" | tail -4

if [ -n "$JIT_PID" ]; then
  wait "$JIT_PID" && log "FusedAdam built" || { log "FusedAdam build failed:"; tail -20 "$OUT/jit.tmp"; }
  cat "$OUT/jit.tmp" >> "$OUT/gpu_bert_large.log"; rm -f "$OUT/jit.tmp"
fi

log "MFU table and profile (benchmarks/gpu_bert_large.py)"
timeout $(($(left) - 60 > 60 ? $(left) - 60 : 60)) $PY benchmarks/gpu_bert_large.py --out "$OUT" --data "$DATA" \
  --profile "${BENCH[@]}" || log "the MFU table did not finish (exit $?): the rows it finished are above"
[ -f "$OUT/profile.txt" ] && sed '/^torch key_averages/,$d' "$OUT/profile.txt"  # the op table stays in the file

if [ "$(left)" -gt 20 ]; then
  log "the other gpu tests: tests/test_gpu.py, $(left) s left"
  timeout "$(left)" $PY -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee -a "$OUT/tests.log" | tail -8 || log "tests/test_gpu.py stopped at the time limit"
else
  log "no time left for tests/test_gpu.py"
fi
log "done; files in $OUT:"
ls -la "$OUT"
