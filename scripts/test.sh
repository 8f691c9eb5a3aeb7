#!/usr/bin/env bash
# The whole test suite on real clusters: the one-node local Slurm for most tests, then the
# two-node cluster for the multi-node tests. Tears down what it started, whatever happens.
set -uo pipefail
cd "$(dirname "$0")/.."
export LTSSL_CLUSTER_DIR=${LTSSL_CLUSTER_DIR:-/tmp/ltssl-cluster}
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)

trap 'slurm/local-cluster down >/dev/null 2>&1' EXIT

slurm/local-cluster up || { echo "test: the local Slurm cluster did not come up" >&2; exit 1; }
eval "$(slurm/local-cluster env)"
"${PYTEST[@]}" -m "not two_nodes" "$@"
status=$?
slurm/local-cluster down

# Multi-node tests run on a two-node cluster of their own (same script, --nodes 2).
if "${PYTEST[@]}" -m two_nodes --collect-only "$@" >/dev/null 2>&1; then
  slurm/local-cluster up --nodes 2 || { echo "test: the two-node Slurm cluster did not come up" >&2; exit 1; }
  eval "$(slurm/local-cluster env)"
  "${PYTEST[@]}" -m two_nodes "$@"
  s2=$?
  slurm/local-cluster down
  ((status == 0)) && status=$s2
fi
exit $status
