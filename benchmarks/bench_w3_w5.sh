#!/usr/bin/env bash
# W3 (offline-small) and W5 (serve-8b) of ../shared/BENCHMARKS.md through `lanner bench`,
# with the HF transformers peer on W3 and a batch-1 latency pair (lanner, HF) beside it.
# The peer pads every batch to its longest request: at 256 requests a batch ran out of
# the H100's memory (2026-11-27), so it runs W3 in batches of 64.
# Run from the repository root on the GPU machine; JSON (and PNG) results land in $OUT.
# All of it takes about 9 minutes (W5's 1000 requests at 4 req/s alone take 250 s), so
# one 600 s call is tight: BENCH_PARTS=w3,latency and BENCH_PARTS=w5 split it in two.
# The GPU image lacks the server's packages: they travel as cp312 wheels in .whl
# (pip download --no-deps --only-binary=:all: --python-version 3.12 ... fastapi starlette
# uvicorn pydantic pydantic_core msgspec pyzmq annotated-types typing-inspection
# annotated-doc), installed here into /tmp/site; without them W5 is skipped.
# W3_PROMPTS and W5_PROMPTS shorten a dry run; BENCH_SMALL, BENCH_BIG, BENCH_ENGINE_ARGS,
# BENCH_PEER_ARGS and BENCH_WHEELS point it elsewhere (e.g. tiny models on the CPU).
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
lanner=(${PYTHON:-python3} -m lanner.entrypoints.cli --log-level WARNING)
tok=lanner/assets/demo-model  # the shapes folders hold no tokenizer; ids are random anyway
small=${BENCH_SMALL:-benchmarks/shapes/qwen3-0.6b}
big=${BENCH_BIG:-benchmarks/shapes/llama3-8b}
engine=(--dtype bfloat16 --max-model-len 4096 ${BENCH_ENGINE_ARGS:-})
peer=(${BENCH_PEER_ARGS:-})

parts=",${BENCH_PARTS:-w3,latency,w5},"  # run a subset, e.g. BENCH_PARTS=w5
want() { [[ $parts == *",$1,"* ]]; }

"${lanner[@]}" bench ceilings

if want w3; then
echo "== W3 lanner"
"${lanner[@]}" bench throughput --model $small --tokenizer $tok --load-format dummy \
    "${engine[@]}" --num-prompts "${W3_PROMPTS:-256}" --dataset-name random \
    --input-len-range 100:1024 --output-len-range 100:1024 --temperature 0.6 --seed 0 \
    --disable-tqdm --output-json "$OUT/W3-lanner.json"

echo "== W3 HF transformers peer"
python3 benchmarks/peers/hf_transformers.py throughput --model $small \
    --num-prompts "${W3_PROMPTS:-256}" --input-len-range 100:1024 --output-len-range 100:1024 --temperature 0.6 --seed 0 \
    --max-batch 64 "${peer[@]}" --output-json "$OUT/W3-hf.json"
fi

if want latency; then
echo "== batch-1 latency (W2 shape): lanner, then the HF peer"
"${lanner[@]}" bench latency --model $small --tokenizer $tok --load-format dummy \
    "${engine[@]}" --batch-size 1 --input-len 128 --output-len 256 \
    --num-iters 5 --num-iters-warmup 1 --temperature 0 --disable-tqdm --plot \
    --output-json "$OUT/W2-latency-lanner.json"
python3 benchmarks/peers/hf_transformers.py latency --model $small --batch-size 1 \
    --input-len 128 --output-len 256 --num-iters 3 --temperature 0 "${peer[@]}" \
    --output-json "$OUT/W2-latency-hf.json"
fi

want w5 || exit 0
wheels=${BENCH_WHEELS:-.whl}
if [ -d "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "import fastapi, uvicorn, pydantic, zmq, msgspec" 2>/dev/null; then
    echo "== W5 skipped: the server's packages are missing (carry .whl)"
    exit 0
fi

echo "== W5 lanner serve + bench serve"
"${lanner[@]}" serve $big --tokenizer $tok --load-format dummy "${engine[@]}" \
    --host 127.0.0.1 --port 8000 --uvicorn-log-level warning \
    > "$OUT/W5-server.log" 2>&1 &
server=$!
ready=0
for _ in $(seq 300); do
    if python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)" 2>/dev/null; then
        ready=1; break
    fi
    kill -0 $server 2>/dev/null || break
    sleep 1
done
if [ $ready = 1 ]; then
    "${lanner[@]}" bench serve --base-url http://127.0.0.1:8000 --model-config $big \
        --vocab-size "${BENCH_VOCAB:-128000}" --num-prompts "${W5_PROMPTS:-1000}" \
        --dataset-name random \
        --input-len-range 50:400 --output-len-range 50:350 --request-rates 4,16,32 \
        --temperature 0 --seed 0 --goodput ttft:1000 tpot:100 --num-warmups 8 \
        --disable-tqdm --plot --output-json "$OUT/W5-serve.json"
else
    echo "server did not come up:"; tail -n 40 "$OUT/W5-server.log"
fi
kill -- $server 2>/dev/null
wait $server 2>/dev/null
exit 0
