#!/usr/bin/env bash
# Run one benchmark command once the machine is quiet: wait until the 1-minute load average
# is below 0.45, then run it. The load average lags by about a minute, so a benchmark started
# right after another one still sees the first one's load (and would carry the "do not
# quote" warning); waiting here is what lets a chain of benchmarks run unattended.
#
#   bash benchmarks/run_quiet.sh python benchmarks/bench_step.py --append
#   for c in small D; do bash benchmarks/run_quiet.sh python benchmarks/bench_step.py --cases $c; done
set -u
while awk '{exit !($1 >= 0.45)}' /proc/loadavg; do sleep 10; done
echo "=== $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*"
exec "$@"
