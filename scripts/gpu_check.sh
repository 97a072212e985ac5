#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (under 8 minutes on one GPU), written to ONE Markdown file:
#   1. the gpu-marked tests (pytest -m gpu)
#   2. bench_train.py: ftune vs the plain Trainer vs TRL SFTTrainer, on both benchmark datasets
#   3. the same with Liger kernels in every run (step 2 has none in any; bench_train skips it in one line without liger-kernel)
#   4. flash attention vs sdpa with packing (bfloat16 weights: flash has no float32 path), ftune and TRL packed, on the
#      long-tailed rows (flash skipped without flash-attn)
#   5. a 4096-token length point (scripts/bench_lengths.py, where the checkout has it)
# Every step runs under its own time limit, cut to what is left of the whole budget, so a hung step cannot eat the
# others' time; a step's exit code and seconds go in the summary table, its output (Markdown tables) below it.
#
# Usage: bash scripts/gpu_check.sh [--dry-run]
#   --dry-run   list every command it would run and exit 0 (no GPU needed)
#   env: OUT (the file goes to $OUT/gpu_check.md, else ./gpu_check.md), PYTHON (default .venv/bin/python),
#        STEPS (optimizer steps per bench run, default 20), GPU_CHECK_SECONDS (whole budget, default 460)
set -u
cd "$(dirname "$0")/.."

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown option '$1' (use --dry-run or nothing)" >&2; exit 2 ;;
esac

py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python
steps="${STEPS:-20}"
budget="${GPU_CHECK_SECONDS:-460}"
report="${OUT:+$OUT/}gpu_check.md"
bench=("$py" scripts/bench_train.py --steps "$steps")
lengths_note=""
[ -f scripts/bench_lengths.py ] || lengths_note="skipped: scripts/bench_lengths.py is not in this checkout"

# name | seconds it may take at most | command
plan=(
  "gpu tests|100|$py -m pytest -m gpu -q -p no:xdist tests"
  "ftune vs Trainer vs TRL|150|${bench[*]} --dataset both --runs abcde"
  "Liger kernels|80|${bench[*]} --dataset both --runs bcd --liger"
  "sdpa, packed|45|${bench[*]} --dataset longtail --runs cd --attn sdpa --set model.dtype=bfloat16"
  "flash attention, packed|45|${bench[*]} --dataset longtail --runs cd --attn flash_attention_2"
  "4096 tokens|60|$py scripts/bench_lengths.py --lengths 4096"
)

if [ "$dry" = 1 ]; then
  for entry in "${plan[@]}"; do
    IFS='|' read -r name limit command <<<"$entry"
    note=""
    [ "$name" = "4096 tokens" ] && [ -n "$lengths_note" ] && note="  # $lengths_note"
    echo "[$name, ${limit}s] $command$note"
  done
  echo "report: $report"
  exit 0
fi

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU visible to $py; run it on a GPU machine (or --dry-run to list the commands)" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
start=$(date +%s)
sections=$(mktemp)
{
  echo "# GPU check"
  echo
  echo "$("$py" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"), $(date -u '+%Y-%m-%d %H:%M UTC'), $steps steps per bench run"
  echo
  echo "| step | command | result | seconds |"
  echo "| --- | --- | --- | --- |"
} >"$report"

for entry in "${plan[@]}"; do
  IFS='|' read -r name limit command <<<"$entry"
  left=$((budget - ($(date +%s) - start)))
  if [ "$name" = "4096 tokens" ] && [ -n "$lengths_note" ]; then
    result="$lengths_note"; seconds=0; output=""
  elif [ "$left" -lt 15 ]; then
    result="skipped: the ${budget}s budget is spent"; seconds=0; output=""
  else
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit}s): $command" >&2
    began=$(date +%s)
    # shellcheck disable=SC2086  # the command is a plain word list built above
    output=$(timeout --kill-after=10 "$limit" $command 2>&1)
    code=$?
    seconds=$(($(date +%s) - began))
    case $code in
      0) result="ok" ;;
      124|137) result="timed out after ${limit}s" ;;
      *) result="failed (exit $code)" ;;
    esac
  fi
  echo "| $name | \`$command\` | $result | $seconds |" >>"$report"
  {
    echo
    echo "## $name: $result"
    echo
    if [ "$name" = "gpu tests" ] || [ "$result" != "ok" ]; then
      # pytest's and a failed run's output are logs, not tables: keep their last lines, verbatim
      echo '```'
      printf '%s\n' "$output" | tail -n 40
      echo '```'
    else
      printf '%s\n' "$output"
    fi
  } >>"$sections"
done

cat "$sections" >>"$report"
rm -f "$sections"
echo "total: $(($(date +%s) - start)) s" >>"$report"
echo "wrote $report"
