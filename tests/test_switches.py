"""The ``DYCOKE_*`` on/off switches read one way everywhere."""

from __future__ import annotations

import pytest

from dycoke.switches import switch


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        (None, True, True),
        (None, False, False),
        ("0", True, False),
        (" OFF ", True, False),
        ("False", True, False),
        ("no", True, False),
        ("1", False, True),
        ("Yes", False, True),
        ("on", False, True),
        ("", True, True),
        ("maybe", False, False),
        ("2", True, True),
    ],
)
def test_a_switch_reads_on_and_off_in_any_case_else_its_default(
    monkeypatch: pytest.MonkeyPatch, value: str | None, default: bool, expected: bool
) -> None:
    if value is None:
        monkeypatch.delenv("DYCOKE_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("DYCOKE_TEST_SWITCH", value)
    assert switch("DYCOKE_TEST_SWITCH", default=default) is expected
