#!/usr/bin/env bash
# Starts Apache Kafka (KRaft, from Maven Central's jars) on loopback for sidetrack's tests.
#
#   testbeds/kafka/start.sh [--nodes 1|3] [--dir DIR]
#
# One node (the default) is a combined broker+controller with replication factor 1 for every
# internal topic. Three nodes form one cluster of three combined broker+controllers with
# replication factor 3 and min.insync.replicas=2, for replication faults (leader death, ISR
# shrink, a stalled broker).
#
# The jars of the pinned release (pom.xml beside this script) are resolved once into
# ~/.cache/sidetrack/kafka-VERSION (Maven caches the downloads in ~/.m2). Storage, logs and one
# control folder per node live in DIR (a new temporary folder by default):
#   DIR/node-N/run       starts node N in the foreground (exec java ...); re-runnable after a kill
#   DIR/node-N/pid       its process id while it runs
#   DIR/node-N/server.log
#   DIR/bootstrap        the bootstrap servers, one line
# The script returns once every node serves (its log says "Kafka Server started" and its port
# accepts connections) and prints the bootstrap servers as its last line. Stop with
# `testbeds/kafka/stop.sh DIR`. JAVA_HOME is honoured; Java 17 or newer.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
nodes=1
dir=""
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case $nodes in 1|3) ;; *) echo "--nodes must be 1 or 3" >&2; exit 2 ;; esac

version=$(sed -n 's#.*<kafka.version>\(.*\)</kafka.version>.*#\1#p' "$here/pom.xml")
java=${JAVA_HOME:+$JAVA_HOME/bin/}java

lib=$("$here/resolve.sh")

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [ -z "$dir" ]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/sidetrack-kafka.XXXXXX"); fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# A KRaft cluster id: 16 random bytes, base64url without padding (what `StorageTool
# random-uuid` prints, without starting a JVM for it). Kafka refuses ids that begin with '-'.
cluster_id=$(python3 -c 'import base64,os
while True:
    s=base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    if not s.startswith("-"): print(s); break')

ports=(); cports=()
for n in $(seq 1 "$nodes"); do ports+=("$(free_port)"); cports+=("$(free_port)"); done
voters=""
for n in $(seq 1 "$nodes"); do
  voters+="${voters:+,}$n@127.0.0.1:${cports[$((n-1))]}"
done
bootstrap=""
for n in $(seq 1 "$nodes"); do bootstrap+="${bootstrap:+,}127.0.0.1:${ports[$((n-1))]}"; done

if [ "$nodes" = 1 ]; then rf=1; isr=1; else rf=3; isr=2; fi
# Each JVM gets a small heap: two cores and the memory are shared with the tests.
heap=${SIDETRACK_KAFKA_HEAP:-$([ "$nodes" = 1 ] && echo 768m || echo 384m)}

for n in $(seq 1 "$nodes"); do
  node=$dir/node-$n
  mkdir -p "$node/data"
  port=${ports[$((n-1))]}
  cport=${cports[$((n-1))]}
  cat >"$node/server.properties" <<EOF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$node/data
# Tests create their topics; the runtime creates its retry and dead-letter topics itself, which
# is what is under test.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
# A group's first join is not held back 3 s for more members.
group.initial.rebalance.delay.ms=0
# Tests use short sessions (6 s) and fail fast; the default floor is 6 s as well.
group.min.session.timeout.ms=1000
# Unclean leader election stays off (the default): a replication test must not pass by
# losing acknowledged records.
unclean.leader.election.enable=false
EOF
  cat >"$node/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $node/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.org.name = org.apache.kafka
logger.org.level = info
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF
  cat >"$node/run" <<EOF
#!/usr/bin/env bash
# Starts node $n of this test cluster in the foreground; its pid is in $node/pid.
echo \$\$ >"$node/pid"
exec "$java" -Xms128m -Xmx$heap -XX:+UseSerialGC -Xss512k \\
  -Dlog4j2.configurationFile="$node/log4j2.properties" \\
  -cp "$lib/*" kafka.Kafka "$node/server.properties"
EOF
  chmod +x "$node/run"
  "$java" -Dlog4j2.configurationFile="$node/log4j2.properties" -cp "$lib/*" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$node/server.properties" \
    --ignore-formatted >"$node/format.log" 2>&1 || { cat "$node/format.log" >&2; exit 1; }
done

for n in $(seq 1 "$nodes"); do
  node=$dir/node-$n
  nohup "$node/run" >"$node/stdout.log" 2>&1 &
done

# Ready when each log says the server started and its port accepts connections (2 min: three
# JVMs starting on two busy cores take a while).
deadline=$((SECONDS + 120))
for n in $(seq 1 "$nodes"); do
  node=$dir/node-$n
  port=${ports[$((n-1))]}
  until grep -q "Kafka Server started" "$node/server.log" 2>/dev/null \
      && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    pid=$(cat "$node/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      tail -n 50 "$node/stdout.log" "$node/server.log" >&2 || true
      echo "Apache Kafka node $n exited" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      tail -n 50 "$node/stdout.log" "$node/server.log" >&2 || true
      echo "Apache Kafka node $n is not serving on 127.0.0.1:$port after 120 s" >&2
      exit 1
    fi
    sleep 0.2
  done
done
echo "$bootstrap" >"$dir/bootstrap"
echo "Apache Kafka $version: $nodes node(s) serving in $dir" >&2
echo "$bootstrap"
