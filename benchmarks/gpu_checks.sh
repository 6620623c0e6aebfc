#!/usr/bin/env bash
# The GPU checks and measurements behind docs/benchmarks.md, in parts that each fit a 10-minute slot:
#   benchmarks/gpu_checks.sh tests      CUDA tests (-m cuda), the README debug run on CUDA, and the CPU
#                                       suite against this machine's torch (GPU hidden, gloo, xdist)
#   benchmarks/gpu_checks.sh ladder A   titanlm vs the HF loop on an 8-layer cut of Llama3-8B at seq 8192,
#                                       rungs A (eager, compile) or B (+selective AC, +float8);
#                                       T: all four rungs, titanlm alone
#   benchmarks/gpu_checks.sh titan      torchtitan's own trainer on the same shape, same rungs
#   benchmarks/gpu_checks.sh profile N  benchmarks/profile_step.py on that shape (eager), then titanlm's
#                                       throughput
#   benchmarks/gpu_checks.sh offload    Llama-3.1-8B's width cut to 16 layers (host memory of a 128 GiB
#                                       machine), seq 4096: peak GPU memory and tokens/s with and without
#                                       FSDP CPU offload; then generate from the debug run's checkpoint on CUDA
#   benchmarks/gpu_checks.sh cp         context parallelism's kernels: each rank's share of a 32K packed row
#                                       against masked SDPA (tests), then its attention time at cp 2 and 4
#                                       against the whole row (benchmarks/cp_attention_time.py)
# Wheels for packages the machine lacks go in .whl/ (see docs/benchmarks.md); logs go to $OUT or ./gpu_logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

bench() {  # bench NAME ARGS...: one rung of the ladder, its JSON kept under $OUT
    local name=$1; shift
    echo "=== $name: $*"
    $PY benchmarks/benchmark.py --model.flavor 8B --n_layers 8 --seq_len 8192 --batch 1 \
        --warmup 3 --steps 5 --rounds 3 --json "$OUT/$name.json" --dump_folder /tmp/bench "$@" 2>&1 \
        | grep -v "^[0-9-]* [0-9:,]* INFO" | tail -20
}

case ${1:-} in
tests)
    (CUDA_VISIBLE_DEVICES= timeout 540 $PY -m pytest -q -x -n 10 -m "not cuda" \
        >"$OUT/cpu_suite.log" 2>&1; echo "cpu suite exit $?" >>"$OUT/cpu_suite.log") &
    timeout 300 $PY -m pytest -q -rs tests/test_cuda.py tests/test_attention.py \
        "tests/test_train.py::test_one_process_low_precision_keeps_fp32_weights_and_computes_under_autocast" 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
    timeout 120 $PY -m titanlm.train --job.config_file train_configs/debug_model.toml --job.dump_folder /tmp/debug \
        2>&1 | grep -E "step=(1|50|100)," | cut -c1-400
    wait
    tail -5 "$OUT/cpu_suite.log"
    ;;
ladder)
    if [ "${2:-A}" = T ]; then  # titanlm alone, every rung
        bench t_eager --peers ""
        bench t_compile --peers "" --compile
        bench t_compile_sac --peers "" --compile --ac selective
        bench t_compile_sac_float8 --peers "" --compile --ac selective --float8
    elif [ "${2:-A}" = A ]; then
        bench eager --peers hf
        bench compile --peers hf --compile
    else
        bench compile_sac --peers hf --compile --ac selective
        bench compile_sac_float8 --peers hf --compile --ac selective --float8
    fi
    ;;
profile)  # profile NAME [overrides]: where an eager step's time goes, then its throughput alone
    name=${2:-eager}; shift 2 || shift
    $PY benchmarks/profile_step.py --model.flavor 8B --model.n_layers 8 --training.seq_len 8192 \
        --training.local_batch_size 1 --top 30 "$@" 2>&1 | grep -v "INFO\|USDT" | tee "$OUT/profile_$name.txt"
    bench "titanlm_$name" --peers ""
    ;;
offload)
    for offload in false true; do
        echo "=== fsdp_cpu_offload=$offload"
        timeout 280 $PY -m titanlm.train --model.flavor 3.1-8B --model.n_layers 16 --training.seq_len 4096 \
            --training.local_batch_size 1 --training.steps 6 --metrics.log_freq 1 --data.dataset random \
            --activation_checkpoint.mode full --parallelism.fsdp_cpu_offload $offload \
            --job.dump_folder "/tmp/offload_$offload" 2>&1 | grep -E "step=|error" | cut -c1-400
    done
    timeout 120 $PY -m titanlm.train --job.config_file train_configs/debug_model.toml --job.dump_folder /tmp/gen \
        --checkpoint.enable --training.steps 50 2>&1 | grep -E "step=50,|saved"
    timeout 60 $PY -m titanlm.tools.generate --checkpoint /tmp/gen/checkpoint/step-50 --prompt "1 + 2 =" \
        --prompt "count: one two" --temperature 0 --max_new_tokens 16 2>&1 | tail -12
    ;;
cp)
    timeout 300 $PY -m pytest -q -rs tests/test_cuda.py -k context_parallel 2>&1 | tee "$OUT/cp_tests.log" | tail -5
    for cp in 2 4; do
        timeout 120 $PY benchmarks/cp_attention_time.py --cp $cp 2>&1 | tee "$OUT/cp_attention_$cp.txt"
    done
    ;;
titan)
    bench titan_eager --peers torchtitan
    bench titan_compile_sac_float8 --peers torchtitan --compile --ac selective --float8
    ;;
*)
    echo "usage: benchmarks/gpu_checks.sh tests | ladder A|B | titan | profile NAME | offload | cp" >&2
    exit 2
    ;;
esac
