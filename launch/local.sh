#!/usr/bin/env bash
# Train on this machine with NPROC workers (default 1).
#   launch/local.sh CONFIG [NPROC] [key=value ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [NPROC] [key=value ...]}
shift
nproc=1
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
exec dist-train train "$config" --nproc "$nproc" "$@"
