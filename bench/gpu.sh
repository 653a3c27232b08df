#!/usr/bin/env bash
# meshtrain on one CUDA GPU: what fits one device, as a user would run it from the repo root.
#
#   bench/gpu.sh            # prints versions, parity CPU vs CUDA, then the SmolLM-1.7B bf16 run
#   OUT=/some/dir bench/gpu.sh   # also keeps the runs' metrics.jsonl there
#
# 1. Installs meshtrain into the current Python without touching its packages (--no-deps).
# 2. Parity on one device: the tiny llama and qwen3 configs (synthetic tokens, fp32, 6 steps) on
#    CUDA give the CPU per-step losses within 1e-4 (different kernels, same math).
# 3. The full SmolLM-1.7B architecture (24 layers), 1 process, bf16, seq_len 2048, eager and with
#    train.compile = true: tokens/s, MFU against the GPU's published dense bf16 peak, peak GPU
#    memory (torch.cuda.max_memory_allocated), and compile_s (step 1's compile time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d)}"
export MESHTRAIN_CACHE="$OUT/cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true

tiny=('data.source="synthetic"' train.steps=6 'checkpoint.resume="never"' checkpoint.every=0)
for cfg in tiny_cpu qwen3_tiny_cpu; do
  for dev in cpu cuda; do
    "$PY" -m meshtrain run "configs/$cfg.toml" ${tiny[@]/#/--set } --set "run.device=\"$dev\"" \
      --set "run.dir=\"$OUT/$cfg-$dev\"" > "$OUT/$cfg-$dev.log" 2>&1 || { tail -20 "$OUT/$cfg-$dev.log"; exit 1; }
  done
  "$PY" - "$OUT/$cfg-cpu/metrics.jsonl" "$OUT/$cfg-cuda/metrics.jsonl" "$cfg" <<'PYEOF'
import json, sys
cpu, gpu = ([json.loads(line)["loss"] for line in open(p)] for p in sys.argv[1:3])
worst = max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu, strict=True))
print(f"parity {sys.argv[3]}: cpu {cpu[0]:.6f}->{cpu[-1]:.6f} cuda {gpu[0]:.6f}->{gpu[-1]:.6f} "
      f"max rel diff {worst:.1e} {'ok' if worst <= 1e-4 else 'FAILED'}")
PYEOF
done

big=(parallel.dp=1 parallel.pp=1 parallel.tp=1 parallel.dp_shard=false model.num_hidden_layers=24
     'data.source="synthetic"' 'train.precision="bf16"' train.seq_len=2048 train.micro_batch_size=8
     train.grad_acc=1 train.steps=8 'checkpoint.resume="never"' checkpoint.every=0)
for compile in false true; do
  run="$OUT/smollm-gpu-compile-$compile"
  "$PY" -m meshtrain run configs/smollm_cpu.toml ${big[@]/#/--set } --set "train.compile=$compile" \
    --set "run.dir=\"$run\"" > "$run.log" 2>&1 || { tail -20 "$run.log"; exit 1; }
  "$PY" - "$run/metrics.jsonl" "$compile" <<'PYEOF'
import json, statistics, sys
every = [json.loads(line) for line in open(sys.argv[1])]
steps = every[1:]  # step 1 is warm-up (and compilation)
med = lambda key: statistics.median(m[key] for m in steps)
print(f"SmolLM-1.7B (24 layers) bf16, compile {sys.argv[2]}, 1 GPU, 8 x 2048 tokens/step: "
      f"{med('tokens_per_s'):,.0f} tok/s, {med('step_time_s'):.3f} s/step, MFU {med('mfu'):.1%}, "
      f"peak GPU memory {max(m['peak_mem_max_rank_gib'] for m in steps):.1f} GiB, "
      f"compile {every[0].get('compile_s', 0):.0f} s, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
PYEOF
done
