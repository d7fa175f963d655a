"""The exception hierarchy and the mapping from Rust errors and gRPC codes."""

from __future__ import annotations

import pytest

import hci
from hci import _hci

CORE = {
    "not_found": hci.NotFound,
    "already_exists": hci.AlreadyExists,
    "conflict": hci.Conflict,
    "invalid": hci.InvalidSpec,
    "out_of_range": hci.OutOfRange,
    "read_only": hci.ReadOnly,
    "busy": hci.Busy,
    "fenced": hci.Fenced,
    "unsupported": hci.Unsupported,
    "unavailable": hci.Unavailable,
    "permission_denied": hci.PermissionDenied,
    "timed_out": hci.Unavailable,
    "corrupt": hci.Corrupt,
    "cancelled": hci.Cancelled,
    "other": hci.HciError,
}

# gRPC code number -> exception.
GRPC = {
    1: hci.Cancelled,
    2: hci.HciError,  # UNKNOWN
    3: hci.InvalidSpec,
    4: hci.Unavailable,  # DEADLINE_EXCEEDED
    5: hci.NotFound,
    6: hci.AlreadyExists,
    7: hci.PermissionDenied,
    9: hci.FailedPrecondition,
    10: hci.Conflict,  # ABORTED
    11: hci.OutOfRange,
    12: hci.Unsupported,
    13: hci.HciError,  # INTERNAL
    14: hci.Unavailable,
    15: hci.Corrupt,  # DATA_LOSS
    16: hci.PermissionDenied,  # UNAUTHENTICATED
}


def test_hierarchy() -> None:
    for cls in CORE.values():
        assert issubclass(cls, hci.HciError) and issubclass(cls, Exception)
    assert issubclass(hci.AlreadyExists, hci.Conflict)
    for cls in (hci.ReadOnly, hci.Busy, hci.Fenced):
        assert issubclass(cls, hci.FailedPrecondition)


@pytest.mark.parametrize("kind,cls", sorted(CORE.items()))
def test_rust_errors_map_with_their_message(kind: str, cls: type[Exception]) -> None:
    with pytest.raises(cls) as e:
        _hci._raise_core_error(kind, "web-1")
    assert type(e.value) is cls
    if kind not in ("out_of_range", "cancelled"):
        assert "web-1" in str(e.value)


def test_causes_are_kept_in_the_message() -> None:
    with pytest.raises(hci.Unavailable, match="web-1 is unavailable: connection refused"):
        _hci._raise_core_error("unavailable", "web-1")


@pytest.mark.parametrize("code,cls", sorted(GRPC.items()))
def test_grpc_codes_map_with_the_message_intact(code: int, cls: type[Exception]) -> None:
    msg = f'volume "x" said {code}: details'
    with pytest.raises(cls) as e:
        _hci._raise_status(code, msg)
    assert type(e.value) is cls and str(e.value) == msg
