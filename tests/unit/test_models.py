"""engine.models: VerifyLevel is the one registry of verification levels."""

from __future__ import annotations

import pytest

from engine.models import VerifyLevel


def test_level_names_come_from_the_enum_weakest_first() -> None:
    assert VerifyLevel.names() == ("size", "checksum", "fits")
    assert [VerifyLevel.parse(name) for name in VerifyLevel.names()] == sorted(VerifyLevel)


@pytest.mark.parametrize("text", ["FITS", " fits ", "Fits", VerifyLevel.FITS])
def test_parse_takes_any_case_and_the_enum_itself(text: str | VerifyLevel) -> None:
    assert VerifyLevel.parse(text) is VerifyLevel.FITS


def test_an_unknown_level_names_the_value_and_every_choice() -> None:
    with pytest.raises(ValueError) as info:
        VerifyLevel.parse("paranoid")
    assert "'paranoid'" in str(info.value)
    assert all(name in str(info.value) for name in VerifyLevel.names())


def test_describe_says_what_every_level_checks() -> None:
    text = VerifyLevel.describe()
    assert all(f"{name}: " in text for name in VerifyLevel.names())
    assert "md5" in text and "CHECKSUM/DATASUM" in text
