#!/usr/bin/env bash
# Runs Kafka's own `kafka-topics` (org.apache.kafka.tools.TopicCommand, from the jars start.sh
# resolved) against BOOTSTRAP with the rest of the arguments, e.g.
#
#   testbeds/kafka/topics.sh 127.0.0.1:9092 --create --topic orders --partitions 4
#
# Kafka's other tools run the same way: `testbeds/kafka/tool.sh CLASS ARGS...`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bootstrap=${1:?usage: topics.sh BOOTSTRAP ARGS...}
shift
exec "$here/tool.sh" org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" "$@"
