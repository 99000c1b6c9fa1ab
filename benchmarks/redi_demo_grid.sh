#!/usr/bin/env bash
# The REDI demo's numbers in docs/redi.md: traces, SFT, REDI, then stage 2 from the same SFT student with
# alpha in {0.8, 0} x lr in {5e-6, 2e-5, 5e-5}. Run from a folder holding demo_assets/ (renio-pl-demo --assets-only):
#   bash <repo>/benchmarks/redi_demo_grid.sh
# Prints held-out accuracy (step:accuracy) for each run. About 4 minutes on 2 CPU cores.
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
configs="$(cd "$(dirname "$0")/.." && pwd)/configs"
accuracy() {
  python -c "import csv, sys; rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get('val/accuracy')]; print(' '.join(r['step'] + ':' + r['val/accuracy'][:5] for r in rows))" "$1"
}
quiet=(--trainer.enable_progress_bar false)
renio-pl-redi-traces --config "$configs/demo_redi_traces.yaml" 2>&1 | grep -o "traces in .*"
/usr/bin/time -f "SFT: %e s" renio-pl-redi fit --config "$configs/demo_redi_sft.yaml" "${quiet[@]}" 2>&1 | grep "^SFT:"
echo "SFT held-out: $(accuracy runs/demo_redi_sft/version_0/metrics.csv)"
/usr/bin/time -f "REDI: %e s" renio-pl-redi fit --config "$configs/demo_redi.yaml" "${quiet[@]}" 2>&1 | grep "^REDI:"
echo "REDI held-out: $(accuracy runs/demo_redi/version_0/metrics.csv)"
mkdir -p runs/redi_grid
for lr in 5e-6 2e-5 5e-5; do
  for alpha in 0.8 0.0; do
    run=runs/redi_grid/alpha${alpha}_lr${lr}
    renio-pl-redi fit --config "$configs/demo_redi.yaml" "${quiet[@]}" --trainer.default_root_dir "$run" \
      --trainer.logger.init_args.save_dir "$run" --trainer.callbacks.folder "$run/student" \
      --model.objective.init_args.alpha "$alpha" --model.optimizer.init_args.lr "$lr" \
      --model.lr_scheduler.init_args.max_lr "$lr" > "$run.log" 2>&1 || { tail -3 "$run.log"; exit 1; }
    echo "alpha $alpha, lr $lr: $(accuracy "$run/version_0/metrics.csv")"
  done
done
