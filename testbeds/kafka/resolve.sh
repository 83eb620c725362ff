#!/usr/bin/env bash
# Resolves the jars of the Apache Kafka release pinned in pom.xml into a cache folder (once per
# version and pom) and prints that folder. Maven caches the downloads in ~/.m2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's#.*<kafka.version>\(.*\)</kafka.version>.*#\1#p' "$here/pom.xml")
pom_sum=$(sha256sum "$here/pom.xml" | cut -c1-12)
lib=${SIDETRACK_KAFKA_LIB:-$HOME/.cache/sidetrack/kafka-$version-$pom_sum}
if [ ! -f "$lib/.complete" ]; then
  echo "resolving Apache Kafka $version into $lib" >&2
  rm -rf "$lib"
  mvn -q -B -f "$here/pom.xml" \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$lib" >&2
  touch "$lib/.complete"
fi
echo "$lib"
