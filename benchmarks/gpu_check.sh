#!/usr/bin/env bash
# One command for a lent GPU machine (run from the repository root):
#
#     bash benchmarks/gpu_check.sh
#
# 1. installs the project (pip install -e ".[dev]"; set SKIP_INSTALL=1 when it is already installed;
#    without network access the install may fail: the script then goes on with what is installed),
# 2. (last, in the time left) the stage tests on CUDA in float32 and float64
#    (python -m pytest --device cuda --dtype all tests/test_stages.py tests/test_spectral.py ...), then
#    the fast test suite (python -m pytest -q -x -k "not slow"; SKIP_TESTS=1 skips both),
# 3. benchmarks.run on CUDA with DINOv2 ViT-S/14-reg (random weights: same compute as the real
#    ones) on 640x480 inputs, batch sizes 1 8 32, with and without the CRF (images/s end to end,
#    peak GPU memory at batch 32), plus the literal CPU reference on the same features,
# 4. the same with bf16 autocast for the backbone,
# 5. benchmarks.memory: peak GPU memory of each stage and of the forward at batch 1 8 32,
# 6. benchmarks.launches: kernels launched and host syncs per stage at batch 1 8 32,
# 7. benchmarks.profile_gpu (batch 32, Chrome trace + NVTX ranges, torch.compile and bf16 variants),
# 8. benchmarks.scaling on CUDA,
# 9. benchmarks.io on CUDA (host cost per image by part, GPU JPEG decoding, sustained images/s of
#    the clasp segment path with a stub model) and benchmarks.segment_e2e (clasp segment end to end
#    on CUDA against CLASP.forward alone on the same images),
# 10. clasp proposals on CUDA over the COCO dev images (or skimage's photos), timed, and its recall
#    (benchmarks.proposals --eval) when the dev data is there,
# and writes every log / CSV / JSON / markdown / trace / plot into a work folder, then packs it as
# ONE archive $OUT/gpu_check_logs.tar.gz beside the short summary $OUT/gpu_check_summary.txt (the
# device returns at most 8 files). $OUT defaults to benchmarks/out.
# Time: every step runs under `timeout`, and a step that would start after BUDGET_S seconds
# (default 420) is skipped and says so, so one call stays well inside the device's 10 minutes.
# DRY_RUN=1 runs every step on the CPU with tiny inputs (a check of the script without a GPU:
#     DRY_RUN=1 SKIP_INSTALL=1 SKIP_TESTS=1 OUT=/tmp/gpu_check_dry bash benchmarks/gpu_check.sh).
#
# Targets (H100, batch 32, 640x480, DINOv2 ViT-S/14-reg): >= 200 images/s with CRF, >= 500 without,
# <= 8 GB peak GPU memory (torch.cuda.max_memory_allocated).
set -u -o pipefail
cd "$(dirname "$0")/.."
FINAL="${OUT:-benchmarks/out}"
mkdir -p "$FINAL"
OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
BUDGET_S="${BUDGET_S:-420}"
T0=$(date +%s)
# run STEP_LIMIT_S CMD...: the command under timeout, or skipped when the budget is spent
within() {
  local limit=$1; shift
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  if [ "$left" -le 10 ]; then echo "SKIPPED (time budget of ${BUDGET_S}s spent): $*"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then echo "STEP FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out')): $*"; fi
  return $rc
}
PY="${PYTHON:-python}"
status=0
# DRY_RUN=1: every step on the CPU with tiny inputs (checks the script and its flags without a GPU)
if [ "${DRY_RUN:-0}" = "1" ]; then
  DEV=cpu; BS="1 2"; BMAX=2; IMG=2; IMG_E=2; REP=1; REP_E=1; SIZE="--size 160 120"; SCAL="--quick"; LAB="2 8"
  IMG_IO=24; IMG_E2E=1; E2E_BS="--batch-size 1 --no-crf"
else
  DEV=cuda; BS="1 8 32"; BMAX=32; IMG=64; IMG_E=32; REP=5; REP_E=3; SIZE=""; SCAL=""; LAB="2 8 16 32"
  IMG_IO=400; IMG_E2E=16; E2E_BS="--batch-size 8"
fi
step() { echo; echo "=== $* ==="; }

{
  step "machine"
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  nproc; grep -m1 'model name' /proc/cpuinfo || true
} 2>&1 | tee "$OUTDIR/gpu_check_machine.log"

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  step "install"
  within 120 "$PY" -m pip install -q -e ".[dev]" 2>&1 | tail -n 20 | tee "$OUTDIR/gpu_check_install.log" \
    || echo "pip install failed (offline?): continuing with the installed packages" | tee -a "$OUTDIR/gpu_check_install.log"
fi


step "benchmarks.run (CUDA, DINOv2 random weights, fp32 backbone)"
within 60 "$PY" -m benchmarks.run --device $DEV --backbone dinov2_vits14_reg --batch-sizes $BS --images $IMG --repeats $REP $SIZE \
  --ref-images 4 --markdown --markdown-file "$OUTDIR/run_cuda_dinov2.md" --csv "$OUTDIR/run_cuda_dinov2.csv" \
  --json "$OUTDIR/run_cuda_dinov2.json" 2>&1 | tee "$OUTDIR/run_cuda_dinov2.log" || status=1

step "benchmarks.run (CUDA, DINOv2 random weights, bf16 backbone)"
within 60 "$PY" -m benchmarks.run --device $DEV --backbone dinov2_vits14_reg --batch-sizes $BMAX --images $IMG --repeats $REP $SIZE \
  --amp bf16 --no-reference --markdown --markdown-file "$OUTDIR/run_cuda_dinov2_bf16.md" \
  --csv "$OUTDIR/run_cuda_dinov2_bf16.csv" --json "$OUTDIR/run_cuda_dinov2_bf16.json" 2>&1 \
  | tee "$OUTDIR/run_cuda_dinov2_bf16.log" || status=1

step "benchmarks.run (CUDA, efficientnet_lite0 real weights)"
within 60 "$PY" -m benchmarks.run --device $DEV --backbone efficientnet_lite0 --batch-sizes $BS --images $IMG_E --repeats $REP_E $SIZE \
  --ref-images 4 --markdown --markdown-file "$OUTDIR/run_cuda_effnet.md" --csv "$OUTDIR/run_cuda_effnet.csv" \
  --json "$OUTDIR/run_cuda_effnet.json" 2>&1 | tee "$OUTDIR/run_cuda_effnet.log" || status=1

step "benchmarks.memory (CUDA, DINOv2 random weights: peak tensor memory per stage, batch 1 8 32)"
within 60 "$PY" -m benchmarks.memory --device $DEV --backbone dinov2_vits14_reg --batch-sizes $BS --crf-labels $LAB $SIZE \
  --json "$OUTDIR/memory_cuda_dinov2.json" --markdown-file "$OUTDIR/memory_cuda_dinov2.md" 2>&1 \
  | tee "$OUTDIR/memory_cuda_dinov2.log" || status=1

step "benchmarks.launches (CUDA: kernels and host syncs per stage, batch 1 8 32)"
within 60 "$PY" -m benchmarks.launches --device $DEV --backbone dinov2_vits14_reg --batch-sizes $BS $SIZE \
  --json "$OUTDIR/launches_cuda_dinov2.json" --markdown-file "$OUTDIR/launches_cuda_dinov2.md" 2>&1 \
  | tee "$OUTDIR/launches_cuda_dinov2.log" || status=1

step "benchmarks.profile_gpu (batch 32, compile + bf16)"
within 60 "$PY" -m benchmarks.profile_gpu --device $DEV --batch-size $BMAX $SIZE --compile --amp bf16 --out-dir "$OUTDIR" 2>&1 \
  | tee "$OUTDIR/profile_gpu.log" || status=1

step "benchmarks.scaling (CUDA)"
within 60 "$PY" -m benchmarks.scaling --device $DEV $SCAL --out-dir "$OUTDIR" 2>&1 | tee "$OUTDIR/scaling_cuda.log" || status=1

step "benchmarks.io (host path of clasp segment: parts, GPU decode, stub-model images/s)"
within 90 "$PY" -m benchmarks.io --device $DEV --images $IMG_IO --repeats 2 --json "$OUTDIR/io_cuda.json" 2>&1 \
  | tee "$OUTDIR/io_cuda.log" || status=1

step "benchmarks.segment_e2e (clasp segment end to end on CUDA vs CLASP.forward alone, same images)"
within 90 "$PY" -m benchmarks.segment_e2e --device $DEV --backbone dinov2_vits14_reg --images $IMG_E2E $E2E_BS \
  --json "$OUTDIR/segment_e2e_cuda.json" 2>&1 | tee "$OUTDIR/segment_e2e_cuda.log" || status=1

step "clasp proposals on CUDA (instances + K-band hierarchy + scoring; time per image, COCO file)"
PROP_IN="../shared/data/cocostuff-val-dev/images"; PROP_EXTRA=""
if [ "${DRY_RUN:-0}" = "1" ] || [ ! -d "$PROP_IN" ]; then  # a few of skimage's photos (an @LIST file)
  "$PY" -c 'import skimage, os; d = os.path.join(os.path.dirname(skimage.__file__), "data")
print("\n".join(os.path.join(d, f) for f in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")))' \
    > "$OUTDIR/proposals_inputs.txt"
  PROP_IN="@$OUTDIR/proposals_inputs.txt"
fi
[ "${DRY_RUN:-0}" = "1" ] && PROP_EXTRA="--no-crf"
PROP_T0=$SECONDS
within 90 "$PY" -m clasp_torch.cli proposals "$PROP_IN" --out "$OUTDIR/proposals_cuda.json" --device $DEV \
  --backbone efficientnet_lite0 --batch-size 4 --quiet $PROP_EXTRA 2>&1 | tail -n 5 | tee "$OUTDIR/proposals_cuda.log" || status=1
echo "clasp proposals wall s (model load included): $((SECONDS - PROP_T0))" | tee -a "$OUTDIR/proposals_cuda.log"
if [ -f "$OUTDIR/proposals_cuda.json" ] && [ "${DRY_RUN:-0}" != "1" ] && [ -d ../shared/data/cocostuff-val-dev ]; then
  within 60 "$PY" -m benchmarks.proposals --eval "$OUTDIR/proposals_cuda.json" --json "$OUTDIR/proposals_cuda_eval.json" \
    2>&1 | tail -n 12 | tee -a "$OUTDIR/proposals_cuda.log" || status=1
fi

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  step "stage tests on the GPU (spectral, clustering, CRF, stage Modules; --device cuda, float32 and float64)"
  within 90 "$PY" -m pytest -q -x -p no:cacheprovider --device $DEV --dtype all tests/test_stages.py \
    tests/test_spectral.py tests/test_cluster.py tests/test_crf.py 2>&1 | tail -n 30 \
    | tee "$OUTDIR/gpu_check_stage_tests.log" || status=1
  step "tests"
  within 150 "$PY" -m pytest -q -x -k "not slow" 2>&1 | tail -n 40 | tee "$OUTDIR/gpu_check_tests.log" || status=1
fi

step "summary against the targets (batch 32)"
"$PY" - "$OUTDIR" "$BMAX" <<'EOF' 2>&1 | tee "$OUTDIR/gpu_check_summary.log"
import json, os, sys
out, bmax = sys.argv[1], int(sys.argv[2])
for name in ("run_cuda_dinov2.json", "run_cuda_dinov2_bf16.json"):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        print(f"{name}: missing"); continue
    d = json.load(open(p))
    for r in d["results"]:
        if r["batch_size"] != bmax:
            continue
        peak_gb = max(r["peak_mem_crf_mib"], r["peak_mem_nocrf_mib"]) / 1024
        print(f"{name} ({d['meta']['machine'].get('gpu')}): with CRF {r['images_per_s_crf']:.0f} img/s (target >= 200) "
              f"{'OK' if r['images_per_s_crf'] >= 200 else 'MISS'}; without CRF {r['images_per_s_nocrf']:.0f} img/s "
              f"(target >= 500) {'OK' if r['images_per_s_nocrf'] >= 500 else 'MISS'}; peak {peak_gb:.2f} GB "
              f"(target <= 8) {'OK' if peak_gb <= 8 else 'MISS'}")
p = os.path.join(out, "memory_cuda_dinov2.json")
if os.path.exists(p):
    for r in json.load(open(p))["rows"]:
        print(f"memory, batch {r['batch_size']}: forward with CRF {r['forward_crf_mib']:.0f} MiB, without "
              f"{r['forward_nocrf_mib']:.0f} MiB (backbone {r['backbone_mib']:.0f}, clustering "
              f"{r['cluster_features_mib']:.0f}, CRF {r['crf_mib']:.0f})")
p = os.path.join(out, "launches_cuda_dinov2.json")
if os.path.exists(p):
    d = json.load(open(p))
    for bs, r in d["rows"].items():
        k = sum(v["kernels"] for s, v in r.items() if s in ("backbone", "cluster_features", "crf"))
        n = sum(v["syncs"] for s, v in r.items() if s in ("backbone", "cluster_features", "crf"))
        print(f"launches, batch {bs}: {k} kernels, {n} syncs; at {d['host_us_per_op']:.1f} us per launch "
              f"(measured) >= {k * d['host_us_per_op'] / 1000 / int(bs):.2f} ms per image of launch time")
p = os.path.join(out, "io_cuda.json")
if os.path.exists(p):
    d = json.load(open(p))
    for f in ("png_no_overlay", "png", "parquet"):
        print(f"clasp segment host path, stub model, {f}: {d['after'][f]:.0f} img/s (before {d['before'][f]:.0f}, "
              f"bound {d['bound'][f]:.0f}; after/bound {d['after_over_bound'][f]:.0%} median of rounds, "
              f"after/before {d['ratio_after_before'][f]:.2f}x)")
    print(f"host path parts (ms per image, one thread; outputs under {d['host'].get('out_root')}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in d["parts_ms"].items()))
p = os.path.join(out, "segment_e2e_cuda.json")
if os.path.exists(p):
    d = json.load(open(p))
    print(f"clasp segment end to end ({d['backbone']}, CRF {d['crf']}, batch {d['batch_size']}): "
          f"{d['segment_images_per_s']:.1f} img/s vs CLASP.forward alone {d['forward_images_per_s']:.1f} img/s "
          f"(segment/forward time {d['segment_over_forward']:.2f})")
p = os.path.join(out, "proposals_cuda.json")
if os.path.exists(p):
    d = json.load(open(p))
    print(f"clasp proposals: {len(d['annotations'])} proposals of {len(d['images'])} images (wall time in proposals_cuda.log)")
p = os.path.join(out, "proposals_cuda_eval.json")
if os.path.exists(p):
    d = json.load(open(p))
    print(f"clasp proposals recall on the COCO dev images: AR@1 {d['AR@1']:.1f} AR@10 {d['AR@10']:.1f} "
          f"AR@100 {d['AR@100']:.1f} AP50 {d['AP50']:.1f} (CPU: see README)")
EOF
cp "$OUTDIR/gpu_check_summary.log" "$FINAL/gpu_check_summary.txt" 2>/dev/null || true
echo "elapsed $(( $(date +%s) - T0 ))s of a ${BUDGET_S}s budget; exit status $status" | tee -a "$FINAL/gpu_check_summary.txt"
tar czf "$FINAL/gpu_check_logs.tar.gz" -C "$OUTDIR" . && rm -rf "$OUTDIR"
echo "outputs: $FINAL/gpu_check_summary.txt and $FINAL/gpu_check_logs.tar.gz (exit status $status)"
exit $status
