"""Under CI (CI=true) a test that needs ../shared fails when it is missing instead of skipping."""
import pytest

from conftest import missing


def test_missing_shared_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        missing("../shared is missing")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        missing("../shared is missing")
