#!/usr/bin/env bash
# Starts the OTLP/HTTP test receiver (receiver.py) on 127.0.0.1:PORT in the background and
# prints its base URL once it answers, for SIDETRACK_TEST_OTLP. Its Python environment (the
# pinned `opentelemetry-proto` from PyPI, which brings `protobuf`) is a venv cached under
# ~/.cache/sidetrack. Usage: start.sh PORT LOGFILE; the receiver's pid is written to LOGFILE.pid.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
port=$1
log=$2
version=1.45.2
venv=${XDG_CACHE_HOME:-$HOME/.cache}/sidetrack/otlp-receiver-$version
if ! "$venv/bin/python" -c 'import opentelemetry.proto' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "opentelemetry-proto==$version"
fi
"$venv/bin/python" "$here/receiver.py" "$port" >"$log" 2>&1 &
echo $! >"$log.pid"
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "http://127.0.0.1:$port"
    exit 0
  fi
  if ! kill -0 "$(cat "$log.pid")" 2>/dev/null; then cat "$log" >&2; exit 1; fi
  sleep 0.1
done
cat "$log" >&2
echo "the OTLP receiver is not answering on 127.0.0.1:$port" >&2
exit 1
