#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): mixed-precision training
# speed, FP16/BF16 latency on the GPU, and a recipe under torchrun on CUDA (NCCL when
# more than one GPU is there) with bf16 autocast.
#   DATA_ROOT=/folder/with/fashion-mnist bash scripts/gpu_check.sh OUT_DIR
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export COMPRESS_CACHE="$out/cache" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
set_root=()
[ -n "${DATA_ROOT:-}" ] && set_root=(--set "data.root=$DATA_ROOT")
gpus=$($python -c "import torch; print(torch.cuda.device_count())")

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
$python scripts/bench_amp.py --device cuda --steps 30 2>"$out/amp.err" | tee "$out/amp.jsonl"
for recipe in resnet_fp16 resnet_bf16; do
  for batch in 1 256; do  # launch-bound at batch 1; the GPU's arithmetic shows at 256
    $python -m compress run "recipes/$recipe.yaml" --set device=cuda "${set_root[@]}" \
      --set evaluate.iterations=200 --set evaluate.latency_batch_size=$batch \
      --out "$out/$recipe-b$batch" > "$out/$recipe-b$batch.txt" 2>&1
    echo "$recipe batch $batch exit $?"; tail -n 8 "$out/$recipe-b$batch.txt"
  done
done
$python -m torch.distributed.run --nproc-per-node "$gpus" -m compress run recipes/resnet_distill.yaml \
  --set device=cuda "${set_root[@]}" --set 'stages[0].distill.train.amp=bf16' \
  --out "$out/distill_torchrun" > "$out/distill_torchrun.txt" 2>&1
echo "distill under torchrun ($gpus GPU) exit $?"; tail -n 8 "$out/distill_torchrun.txt"
