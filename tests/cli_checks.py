"""The contract every CLI user error is tested against: exit 2, no traceback, exactly one ``error:`` line (the last
line of stderr) matching the expected text, and nothing left in the output folder."""
from __future__ import annotations

import re
from pathlib import Path


def assert_user_error(result, pattern: str, out_dir: Path | None = None) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    if out_dir is not None and out_dir.exists():
        assert list(out_dir.iterdir()) == [], "a failed command must leave no artifact behind"
