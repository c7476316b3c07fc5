#!/usr/bin/env bash
# Run the study and publish it: scripts/study.sh OUT_DIR [key=value ...]
#
# Runs `.venv/bin/python flows/suite.py KEY=VALUE... report_dir=OUT_DIR/report` and writes OUT_DIR/README.md with
# what a reader needs to trust the report: the exact command, the commit (and whether the tree was clean), the
# machine, the load average while it ran, the wall time, the peak memory and the exit status. The suite's log is
# OUT_DIR/suite.log. Example: scripts/study.sh results/study-3seed seeds=3
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || "$1" == -h || "$1" == --help || "$1" == help ]]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
out="$1"; shift
python=.venv/bin/python
[[ -x "$python" ]] || { echo "error: $python not found: run 'make install' first" >&2; exit 2; }
mkdir -p "$out"
command=("$python" flows/suite.py "$@" "report_dir=$out/report")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (with uncommitted changes)" || true)
start=$(date -u +%Y-%m-%dT%H:%M:%SZ); t0=$(date +%s)

# The load average once a minute, beside the run: a 2-vCPU machine shared with other jobs runs 3-6x slower.
( while sleep 60; do cut -d' ' -f1 /proc/loadavg; done ) > "$out/.load" &
sampler=$!
set +e
if [[ -x /usr/bin/time ]]; then
    /usr/bin/time -v -o "$out/.time" "${command[@]}" > "$out/suite.log" 2>&1
else
    "${command[@]}" > "$out/suite.log" 2>&1   # no GNU time: no peak-memory figure
fi
status=$?
set -e
kill "$sampler" 2>/dev/null || true
wall=$(( $(date +%s) - t0 ))
peak_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$out/.time" 2>/dev/null || echo 0)
load=$(sort -n "$out/.load" 2>/dev/null | awk 'NR==1{min=$1} {max=$1} END{if (NR) printf "%s-%s (%d samples)", min, max, NR; else print "not sampled"}')
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
rm -f "$out/.load" "$out/.time"

cat > "$out/README.md" <<EOF
# Study run: $(basename "$out")

- command: \`${command[*]}\`
- commit: \`$commit\`$dirty
- machine: $(nproc) vCPUs ($cpu), $mem RAM, no GPU
- started: $start; wall: $((wall / 60)) min $((wall % 60)) s; exit status: $status
- peak memory (largest process): $(( ${peak_kb:-0} / 1024 )) MiB
- load average while it ran (1-minute, once a minute): $load
- the report: [report/report.md](report/report.md); the suite's log: suite.log
EOF
echo "study: exit $status after $((wall / 60)) min; $out/README.md"
exit $status
