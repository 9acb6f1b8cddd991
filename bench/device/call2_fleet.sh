# the GPU fleet config end to end: in process (1 GPU), Flower on Ray (1 GPU, 2 GPUs); FLEET="flower1 flower2" picks,
# EXTRA="--set federation.rounds=4" adds arguments to each.
# Needs only site.tar.xz (the first call may carry it with this script); a call that carries gguf.part00 keeps
# SmolLM2's first half in /tmp for call 3 (FLEET="" copies it and runs nothing else).
source .dev/s5/setup.sh   # bench/device/setup.sh, copied there by make_bundle.sh
[ -f .dev/s5/gguf.part00 ] && cp .dev/s5/gguf.part00 /tmp/gguf.part00
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
mkdir -p /tmp/runs
fleet() {  # name, seconds, CUDA devices, extra args
  CUDA_VISIBLE_DEVICES=$3 timeout $2 python3 -m fedtune.cli simulate configs/gpu-fleet.yaml --out /tmp/runs/$1 "${@:4}" > /tmp/runs/$1.log 2>&1
  echo "== $1 rc=$? =="; grep -v -i warn /tmp/runs/$1.log | tail -4
  python3 - "$1" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"/tmp/runs/{sys.argv[1]}/metrics.jsonl")] if __import__("os").path.exists(f"/tmp/runs/{sys.argv[1]}/metrics.jsonl") else []
for r in recs:
    groups = sorted({round(c.get("train-seconds", -1), 2) for c in r.get("clients") or []})  # one per packed group
    print({k: r.get(k) for k in ("round", "clients_succeeded", "eval_perplexity", "epsilon", "wall_seconds", "device_steps_per_s", "tokens_per_s")}, "group s", groups)
PY
  cp /tmp/runs/$1/metrics.jsonl $OUT/$1_metrics.jsonl 2>/dev/null
}
for run in ${FLEET-inproc flower1 flower2}; do
  case $run in
    inproc*) fleet $run 120 0 --backend inprocess $EXTRA ;;
    flower1*) fleet $run 170 0 $EXTRA ;;
    flower2*) fleet $run 170 0,1 --set simulation.max_concurrent_clients=2 $EXTRA ;;
  esac
  cp /tmp/runs/$run/events.jsonl $OUT/${run}_events.jsonl 2>/dev/null
done
tail -30 /tmp/runs/flower1/flower/*.log 2>/dev/null | grep -i -E "error|exception" | head -5
