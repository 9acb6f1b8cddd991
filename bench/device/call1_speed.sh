# call 1: issue 14 benches on GPU 0 (ghost clipping on the GPU for the first time), side by side with bare peft + opacus
source .dev/s5/setup.sh   # bench/device/setup.sh, copied there by make_bundle.sh
python3 -c "import torch, transformers, peft, opacus, bitsandbytes, flwr, ray; print(torch.__version__, transformers.__version__, peft.__version__, opacus.__version__, bitsandbytes.__version__, flwr.__version__, ray.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())" 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
export CUDA_VISIBLE_DEVICES=0
timeout 100 python3 bench/client_step.py --shape smollm2 --quant nf4 --dp on --impl fedtune,fedtune-ghost,bare,bare-ghost \
  --mode plain --steps 4 --repeats 5 --json $OUT/smollm2_step.json 2>&1 | grep -v Warning | tail -12
timeout 330 python3 bench/client_step.py --shape llama1b --quant nf4 --dp on --batch 8 --seq 1024 --rank 16 --targets all \
  --steps 3 --repeats 2 --mode plain,efficient2,efficient --impl fedtune,fedtune-ghost,bare,bare-ghost \
  --json $OUT/llama1b.json --profile $OUT/profile_llama1b.txt 2>&1 | grep -v Warning | tail -25
timeout 80 python3 bench/packed_fleet.py --shape smollm2 --devices 64,128 --solo-devices 4 --dp on --bare --check --steps 4 \
  --repeats 2 --json $OUT/packed.json 2>&1 | grep -v Warning | tail -8
