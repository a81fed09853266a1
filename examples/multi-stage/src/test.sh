#!/bin/sh
# The test suite: fails the build when greet misbehaves.
set -e
out="$("$1" tester)"
case "$out" in
  "hello, tester, from greet "*) echo "ok 1 - greets by name" ;;
  *) echo "not ok 1 - got: $out"; exit 1 ;;
esac
cd "$(dirname "$1")" && sha256sum -c greet.sha256 >/dev/null && echo "ok 2 - checksum matches"
