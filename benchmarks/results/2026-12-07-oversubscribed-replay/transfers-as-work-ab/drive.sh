#!/bin/bash
# drive.sh ONLY TAG T1 T2 ... : runs fidelity --calibrate-each --only ONLY in /tmp/fid$T for each T in turn
only="$1"; tag="$2"; shift 2; i=0
for T in "$@"; do
  i=$((i+1))
  cd /tmp/fid$T && python -m benchmarks.fidelity --calibrate-each --only "$only" --report /tmp/ab/$tag-$i-$T.md > /tmp/ab/$tag-$i-$T.log 2>&1
  echo "$(date +%T) $tag $i $T rc $?" >> /tmp/ab/$tag.progress
done
