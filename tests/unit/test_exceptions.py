"""engine.exceptions: one translation of OSError into the LocalError tree, as a function and a context."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from engine.exceptions import (
    EXIT_LOCAL,
    DestinationBusyError,
    DiskFullError,
    LocalError,
    ManifestError,
    PermissionDeniedError,
    TransferError,
    local_error_from_oserror,
    os_errors,
)


@pytest.mark.parametrize(
    ("code", "cls", "words"),
    [
        (errno.ENOSPC, DiskFullError, "no space left"),
        (errno.EDQUOT, DiskFullError, "quota"),
        (errno.EACCES, PermissionDeniedError, "permission denied"),
        (errno.EPERM, PermissionDeniedError, "not permitted"),
        (errno.EROFS, PermissionDeniedError, "read-only"),
    ],
)
def test_os_errors_maps_each_errno_to_its_class_with_path_and_verb(
    code: int, cls: type[LocalError], words: str, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.ecsv"
    with pytest.raises(cls) as info, os_errors(plan, "write the plan"):
        raise OSError(code, "the kernel's words")
    assert words in str(info.value).lower()
    assert "write the plan" in str(info.value) and str(plan) in str(info.value)
    assert info.value.path == plan
    assert info.value.exit_code == EXIT_LOCAL
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code


def test_an_unknown_errno_becomes_the_default_class_with_its_hint(tmp_path: Path) -> None:
    manifest_errors = os_errors(tmp_path, "read", default=ManifestError, hint="see the manifest")
    with pytest.raises(ManifestError) as info, manifest_errors:
        raise OSError(errno.EIO, "Input/output error")
    assert str(info.value) == f"cannot read {tmp_path}: Input/output error (see the manifest)"


def test_the_key_is_named_after_the_path(tmp_path: Path) -> None:
    error = local_error_from_oserror(OSError(errno.EROFS, "x"), tmp_path, "write to", key="output.out_dir")
    assert f"{tmp_path} (output.out_dir)" in str(error)


def test_permission_hint_replaces_only_the_permission_hint(tmp_path: Path) -> None:
    denied = local_error_from_oserror(
        OSError(errno.EACCES, "x"), tmp_path, "read", permission_hint="ask root"
    )
    full = local_error_from_oserror(OSError(errno.ENOSPC, "x"), tmp_path, "read", permission_hint="ask root")
    assert denied.hint == "ask root"
    assert full.hint is not None and "free some space" in full.hint


def test_os_errors_lets_everything_else_through(tmp_path: Path) -> None:
    with pytest.raises(ValueError), os_errors(tmp_path, "read"):
        raise ValueError("not a file error")
    with pytest.raises(DiskFullError) as info, os_errors(tmp_path, "read"):
        raise DiskFullError("already translated", path=tmp_path)
    assert str(info.value) == "already translated"
    with os_errors(tmp_path, "read"):
        pass  # no error, nothing raised


def test_a_busy_destination_is_a_transfer_error_never_retried() -> None:
    error = DestinationBusyError("x.fits: another download is writing this file right now; skipped")
    assert isinstance(error, TransferError)
    assert error.retryable is False
    assert TransferError("other").retryable is True
