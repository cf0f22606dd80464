#!/usr/bin/env bash
# Relabels each saved report with its config name (the run directory) and prints one
# infermesh-bench table per phase.
cd "$(dirname "$0")"
mkdir -p reports
for phase in explore full full-repeat shipped; do
  files=()
  for d in $phase/*/; do
    name=$(basename $d)
    for j in $d/shared-prefix/*.json; do
      [ -f "$j" ] || continue
      python3 - "$j" "reports/$phase-$name.json" "$name" <<'PY'
import json,sys
d=json.load(open(sys.argv[1]))
for r in d: r['label']=sys.argv[3]
json.dump(d,open(sys.argv[2],'w'),indent=1)
PY
      files+=("reports/$phase-$name.json")
    done
  done
  [ ${#files[@]} -gt 0 ] && { echo "## $phase"; ../../../target/release/infermesh-bench table "${files[@]}"; }
done
