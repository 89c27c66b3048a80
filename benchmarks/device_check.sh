#!/usr/bin/env bash
# omni on one GPU in at most 8 minutes (H100/H200): the gpu-marked tests (cuDNN flash attention against the XLA
# path, values and gradients, dense, banded and packed), a bf16 training step at GPT-3 XL shapes (as many layers
# as fit) with MFU against the data-sheet peak, decode tokens/s at batch 1 and 64, and one PPO iteration's split
# (generation, scoring, training). Appends the numbers, with the device's name, to benchmarks/RESULTS.md and,
# where the device tool sets $OUT, copies them there.
#
#   benchmarks/device_check.sh          # on the GPU
#   benchmarks/device_check.sh --toy    # the same steps at toy sizes: a check of the script itself, on a CPU
#
# The GPU image lacks grain, tensorflow-datasets, ml-collections and tensorboardX. benchmarks/device_wheels.sh
# downloads them and what they need into .whl/ (ignored by git) on a machine with PyPI; the device run carries
# .whl and this script installs it first.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import grain, tensorflow_datasets, ml_collections, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/omni-site .whl/*.whl
  export PYTHONPATH=/tmp/omni-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log=$(mktemp -d)
if [ "${1:-}" = --toy ]; then
  train=(--layers 2 --d_model 256 --heads 4 --vocab 1024 --seq 256 --batch 2 --steps 2 --attention xla)
  decode=(--batches 1,4 --rounds 1)
  steps=2; iterations=2; episodes=64
else
  train=(--layers 24 --batch 8 --steps 10)
  decode=(--batches 1,64 --rounds 3)
  steps=20; iterations=3; episodes=0
fi
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*" >&2; }

stamp "gpu-marked tests"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -3 | tee "$log/tests.txt" || true

stamp "bf16 training step"
python3 benchmarks/gpu_train.py "${train[@]}" | tail -1 > "$log/train.json"

stamp "decode"
python3 benchmarks/generate_throughput.py --no-hf "${decode[@]}" | tail -1 > "$log/decode.json"

stamp "PPO iteration (SFT and reward model from $steps-step runs)"
work=$(mktemp -d)
quiet=(--config.train.eval_every=100000 --config.train.checkpoint_every=$steps --config.train.steps=$steps
       --config.optim.warmup_steps=1)
python3 -m omni.main --config=configs/tiny.py "${quiet[@]}" --workdir="$work/pre" > "$log/pre.txt"
python3 -m omni.main --config=configs/sft_tiny.py --config.init_from="$work/pre" "${quiet[@]}" \
  --workdir="$work/sft" > "$log/sft.txt"
python3 -m omni.main --config=configs/rm_tiny.py --config.init_from="$work/sft" "${quiet[@]}" \
  --workdir="$work/rm" > "$log/rm.txt"
python3 benchmarks/ppo_iteration.py --sft="$work/sft" --rm="$work/rm" --iterations=$iterations \
  --rollout_batch=$episodes | tail -1 \
  > "$log/ppo.json"

stamp "report"
python3 - "$log" "${1:-}" >> benchmarks/RESULTS.md <<'EOF'
import datetime, json, sys
log, toy = sys.argv[1], sys.argv[2] == "--toy"
read = lambda name: json.load(open(f"{log}/{name}.json"))
train, decode, ppo = read("train"), read("decode"), read("ppo")
tests = open(f"{log}/tests.txt").read().strip().splitlines()
print(f"\n### Device check, {datetime.date.today()}: {train['device']}{' (toy sizes: a check of the script)' if toy else ''}")
print("`benchmarks/device_check.sh" + (" --toy" if toy else "") + "`\n")
print(f"- gpu-marked tests: {tests[-1] if tests else 'no output'}")
print(f"- bf16 training step, GPT-3 shapes ({train['layers']} layers, d_model {train['d_model']}, batch "
      f"{train['batch']} x {train['seq']}, remat {train['remat']}, attention {train['attention']}): "
      f"{train['tokens_per_s']:,.0f} tokens/s, MFU {train['mfu']:.1%} of {train['peak_flops'] / 1e12:.3g} TFLOP/s "
      f"({train['peak_source']}), compiled peak {train['peak_memory_gib']:.1f} GiB")
rates = ", ".join(f"batch {k.rsplit('_b', 1)[1]}: {v:,.0f}" for k, v in decode.items()
                  if k.startswith("decode_tokens_per_s_b"))
print(f"- decode tokens/s ({decode['shape']['layers']} layers, d_model {decode['shape']['d_model']}, "
      f"{decode['new_tokens']} new tokens): {rates}")
print(f"- PPO iteration (configs/ppo_tiny.py, {ppo['rollout_batch']} episodes): {ppo['iteration_s']:.2f} s = "
      f"generation {ppo['generate_share']:.0%}, scoring {ppo['score_share']:.0%}, training {ppo['train_share']:.0%}; "
      f"rollout {ppo['rollout_tokens_per_s']:,.0f} tokens/s")
EOF
if [ -n "${OUT:-}" ]; then cp benchmarks/RESULTS.md "$log"/*.json "$log"/*.txt "$OUT"/; fi
stamp "done"
tail -8 benchmarks/RESULTS.md
