from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Every async test runs on plain asyncio and on asyncio + uvloop."""
    return request.param  # type: ignore[no-any-return]


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``, read from /proc."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid and "zombie" not in fields.get(
                "State", "").lower():
            found.append(int(entry))
    return found


@pytest.fixture(autouse=True, scope="session")
def no_process_left_behind() -> Iterator[None]:
    """Every worker a test starts must be reaped by the end of the run."""
    import os
    import sys

    yield
    if sys.platform.startswith("linux"):
        left = _children(os.getpid())
        assert not left, f"test run left processes behind: {left}"
