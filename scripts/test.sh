#!/usr/bin/env bash
# The test suite: install the package with its test extras, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt -e ".[test]"
python3 -m pytest -q --durations=15 "$@"
