# call 2: keep the first half of SmolLM2's GGUF; the GPU fleet config end to end: in process (1 GPU), Flower on Ray (1 GPU, 2 GPUs)
source .dev/s5/setup.sh   # bench/device/setup.sh, copied there by make_bundle.sh
cp .dev/s5/gguf.part00 /tmp/gguf.part00
mkdir -p /tmp/runs
fleet() {  # name, seconds, CUDA devices, extra args
  CUDA_VISIBLE_DEVICES=$3 timeout $2 python3 -m fedtune.cli simulate configs/gpu-fleet.yaml --out /tmp/runs/$1 "${@:4}" > /tmp/runs/$1.log 2>&1
  echo "== $1 rc=$? =="; grep -v -i warn /tmp/runs/$1.log | tail -4
  python3 - "$1" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"/tmp/runs/{sys.argv[1]}/metrics.jsonl")] if __import__("os").path.exists(f"/tmp/runs/{sys.argv[1]}/metrics.jsonl") else []
for r in recs:
    print({k: r.get(k) for k in ("round", "clients_succeeded", "eval_perplexity", "epsilon", "wall_seconds", "device_steps_per_s", "tokens_per_s")})
PY
  cp /tmp/runs/$1/metrics.jsonl $OUT/$1_metrics.jsonl 2>/dev/null
}
fleet inproc 120 0 --backend inprocess
fleet flower1 170 0
fleet flower2 170 0,1 --set simulation.max_concurrent_clients=2
tail -30 /tmp/runs/flower1/flower/*.log 2>/dev/null | grep -i -E "error|exception" | head -5
