#!/usr/bin/env bash
# `make test`: install what is missing (cached), start the test environment unless it is already
# up, run unit and integration tests against it, and stop it again if this script started it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash hack/install-deps.sh
started_here=0
bash hack/testenv.sh status >/dev/null 2>&1 || started_here=1
bash hack/testenv.sh up
if [[ $started_here == 1 && "${SERVICEDB_KEEP_TESTENV:-0}" != 1 ]]; then
  trap 'bash hack/testenv.sh down' EXIT
fi

cargo build --bins
# Integration tests mostly wait on real components, so more threads than cores pays off.
cargo test --lib --bins --tests -- --test-threads="${SERVICEDB_TEST_THREADS:-4}"
