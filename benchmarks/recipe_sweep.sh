#!/bin/bash
# Augmentation recipes for swin_unetr, trained in parallel and each evaluated through the bundle path
# (benchmarks/cross_subject.py: template held-out region + Colin27). Used on a lent H100 for the
# README's "Cross-subject" table; 16 CPU cores feed 8 runs of 2 threads.
#
#   benchmarks/recipe_sweep.sh TEMPLATES_DIR OUT_DIR [DEVICE]
#   TEMPLATES_DIR: ch2.nii.gz, ch2bet.nii.gz, aal.nii.gz (Debian mricron-data: /usr/share/mricron/templates)
set -u
templates=$1; out=$2; device=${3:-cuda}
mkdir -p "$out"
run() {  # name, overrides...
  local name=$1; shift
  local start=$(date +%s)
  OMP_NUM_THREADS=2 python3 -m medimg.train bundle=swin_unetr runs_dir="$out/runs_$name" \
      trainer.enable_progress_bar=false "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? train_s=$(( $(date +%s) - start )) $*" >> "$out/times.txt"
  local b=$(ls -d "$out"/runs_"$name"/swin_unetr/*/bundle 2>/dev/null | head -1)
  [ -n "$b" ] && OMP_NUM_THREADS=2 python3 benchmarks/cross_subject.py --templates "$templates" --device "$device" \
      --bundle "$b" --json "$out/$name.json" >> "$out/$name.eval" 2>&1
}
python3 -c "from medimg.data.embedded import embedded_manifest; embedded_manifest('mni152', None)" || exit 1
run light data.augment=light bundle.max_epochs=25 bundle.val_every=5 &
run strong data.augment=strong bundle.max_epochs=25 bundle.val_every=5 &
run synth data.augment=synth bundle.max_epochs=25 bundle.val_every=5 &
run synth_e40 data.augment=synth &
run head10 data.augment=synth 'data.synth={head_only_prob:1.0}' bundle.max_epochs=25 bundle.val_every=5 &
run head10_e40 data.augment=synth 'data.synth={head_only_prob:1.0}' &
run head08 data.augment=synth 'data.synth={head_only_prob:0.8}' bundle.max_epochs=25 bundle.val_every=5 &
run head10_c8 data.augment=synth 'data.synth={head_only_prob:1.0,clutter_prob:0.8}' bundle.max_epochs=25 bundle.val_every=5 &
wait
cat "$out/times.txt"
for f in "$out"/*.eval; do tail -1 "$f"; done
