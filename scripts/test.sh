#!/usr/bin/env bash
# The test suite: install the package with its test extras, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt -e ".[test]"
# serve's tritonserver binary; --no-deps because the wheel's metadata pins numpy<2 (see pyproject.toml)
python3 -m pip install -q --no-deps nvidia-pytriton==0.7.0
python3 -m pytest -q --durations=15 "$@"
