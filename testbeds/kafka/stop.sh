#!/usr/bin/env bash
# Stops every node of a cluster that `start.sh --dir DIR` started (SIGTERM, then SIGKILL after
# 20 s) and, with --clean, deletes DIR.
#
#   testbeds/kafka/stop.sh DIR [--clean]
set -uo pipefail
dir=${1:?usage: stop.sh DIR [--clean]}
pids=()
for pidfile in "$dir"/node-*/pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  # A stopped (SIGSTOP) node would never act on SIGTERM.
  kill -CONT "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
done
for _ in $(seq 1 100); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 0.2
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
if [ "${2:-}" = "--clean" ]; then rm -rf "$dir"; fi
