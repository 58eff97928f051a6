"""`graysteer serve` raises its soft open-file limit to the hard one before serving, so the
HTTP transport's connection cap is not a shell's 1,024 less a reserve."""

import resource
import subprocess
import sys
import textwrap

import pytest

from sidecar.serving.descriptors import UNLIMITED_SOFT, raise_open_file_limit


def test_a_low_soft_limit_is_raised_to_the_hard_one() -> None:
    script = textwrap.dedent(
        """
        import resource
        from sidecar.serving.descriptors import raise_open_file_limit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNLIMITED_SOFT if hard == resource.RLIM_INFINITY else hard
    assert out.split() == [str(wanted), str(wanted)]


def test_the_soft_limit_rises_only_as_far_as_the_hard_one() -> None:
    script = textwrap.dedent(
        """
        import resource
        from sidecar.serving.descriptors import raise_open_file_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))  # lowering the hard limit is for good
        print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "300 (300, 300)"


def test_a_refused_raise_keeps_the_limit_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))

    def refuse(_: int, __: tuple[int, int]) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert raise_open_file_limit() == 256
    assert "open file limit stays at 256 (raising it to 4096 failed" in caplog.text
