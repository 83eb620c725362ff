#!/usr/bin/env bash
# Runs one of Apache Kafka's command-line tools by its main class, on the classpath of the
# pinned release (resolved by start.sh), e.g.
#
#   testbeds/kafka/tool.sh org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
#       --bootstrap-server 127.0.0.1:9092 --describe --group billing
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lib=$("$here/resolve.sh")
java=${JAVA_HOME:+$JAVA_HOME/bin/}java
# Tools log through Log4j2 too; keep them quiet but for errors.
exec "$java" -Xmx256m -Dlog4j2.level=error -Dlog4j2.rootLevel=error -cp "$lib/*" "$@"
