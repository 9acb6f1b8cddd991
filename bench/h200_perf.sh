#!/bin/bash
# The H200 measurements of docs/benchmarks.md ("Hardware speed"), one call of the device tool each:
# wheels from .whl (opacus, bitsandbytes, pydantic ...), this checkout copied to .dev/perf.
#   PART=1 bash bench/h200_perf.sh   # one device, packed, Llama-1B; results and profiles under $OUT
#   PART=2 bash bench/h200_perf.sh   # after the packed changes: one device and packed, cuDNN attention on/off
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
python3 -c "import torch, transformers, peft, opacus, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, opacus.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())"
if [ "${PART:-1}" = 1 ]; then
  # one device at a time, SmolLM2 shape, 4 x 128, DP: fedtune vs a bare peft + opacus loop (hooks, ghost)
  timeout 100 python3 bench/client_step.py --shape smollm2 --quant nf4 --dp on --impl fedtune,bare,bare-ghost \
    --mode plain --steps 4 --repeats 5 --json $OUT/smollm2_step.json --profile $OUT/profile_step.txt
  # packed fleet vs one bare non-private model at the same total batch
  timeout 100 python3 bench/packed_fleet.py --shape smollm2 --devices 64 --dp on --bare --check --steps 4 \
    --repeats 2 --json $OUT/packed.json --profile $OUT/profile_packed.txt
  # Llama-3.2-1B shape, nf4 + LoRA r=16 on all linears + DP, 8 x 1024
  timeout 200 python3 bench/client_step.py --shape llama1b --quant nf4 --dp on --batch 8 --seq 1024 --rank 16 \
    --targets all --steps 3 --repeats 3 --mode plain,efficient2,efficient --impl fedtune,bare \
    --json $OUT/llama1b.json --profile $OUT/profile_llama1b.txt
else
  for sdpa in auto no-cudnn; do
    timeout 60 python3 bench/client_step.py --shape smollm2 --quant nf4 --dp on --impl fedtune,bare --mode plain \
      --steps 4 --repeats 3 --sdpa $sdpa --json $OUT/smollm2_step_$sdpa.json
    timeout 90 python3 bench/packed_fleet.py --shape smollm2 --devices 64,128 --solo-devices 4 --dp on --bare \
      --check --steps 4 --repeats 2 --sdpa $sdpa --json $OUT/packed_$sdpa.json
  done
fi
