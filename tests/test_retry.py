"""The retry layer's rules: what is retried, how long it waits, and that a retried
create or state change never happens twice although its first answer was lost."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from trackbridge import retry
from trackbridge.report import scrub
from trackbridge.trackers.mlflow import common as mc


@pytest.fixture(autouse=True)
def fast_policy():
    before = (retry.POLICY.attempts, retry.POLICY.initial, retry.POLICY.maximum)
    retry.configure(attempts=4, initial=0.001, maximum=0.01)
    yield
    retry.configure(*before)


def test_a_create_whose_answer_was_lost_is_found_not_repeated() -> None:
    made: list[str] = []

    def create() -> str:
        made.append(f"run{len(made)}")
        if len(made) == 1:
            raise ConnectionResetError("applied, but the answer never came")
        return made[-1]

    assert mc.create_once(create, lambda: made[0] if made else None) == "run0"
    assert made == ["run0"]


def test_a_state_change_done_by_a_lost_first_attempt_counts_as_done() -> None:
    state = {"stage": "deleted", "calls": 0}

    def restore() -> None:
        state["calls"] += 1
        if state["stage"] != "deleted":
            raise MlflowException("run must be deleted to restore", error_code="INVALID_PARAMETER_VALUE")
        state["stage"] = "active"
        raise ConnectionResetError("lost")

    mc.change_once(lambda: retry.POLICY.call(restore), lambda: state["stage"] == "active")
    assert state == {"stage": "active", "calls": 2}
    with pytest.raises(MlflowException):  # a refusal for any other reason still surfaces
        mc.change_once(lambda: retry.POLICY.call(restore), lambda: False)


def test_what_is_retried_and_how_long_it_waits() -> None:
    busy = MlflowException(
        "API request to http://h/api failed with exception HTTPConnectionPool(host='h', port=5000): "
        "Max retries exceeded (Caused by ResponseError('too many 503 error responses'))"
    )
    assert retry.status_of(busy) == 503 and retry.retryable(busy)
    dropped = MlflowException(
        "API request to http://h/api failed with exception ('Connection aborted.', "
        "RemoteDisconnected('Remote end closed connection without response'))"
    )
    assert retry.retryable(dropped)
    assert not retry.retryable(MlflowException("nope", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not retry.retryable(retry.HttpStatusError(404, "missing"))

    # the MLflow error raised while handling our HTTP error keeps it as __context__
    try:
        try:
            raise retry.HttpStatusError(429, "slow down", retry_after="7")
        except Exception as e:
            raise MlflowException(f"API request failed with exception {e}")  # noqa: B904 (as MLflow does)
    except MlflowException as wrapped:
        kept = wrapped
    assert retry.retry_after(kept) == 7.0 and retry.status_of(kept) == 429
    policy = retry.RetryPolicy(maximum=5.0)
    assert policy.wait_for(kept, 1) == 5.0 and policy.obeyed == 1  # capped at the maximum
    assert 0 <= policy.wait_for(busy, 3) <= 4.0  # backoff: up to initial * 2**(n-1), jittered


def test_credentials_never_reach_printed_text() -> None:
    text = scrub(
        "API request to https://bob:s3cret@host/api failed; token=abc123 api_key: zz9 "
        "Authorization: Bearer eyJhbGciOi.x"
    )
    for secret in ("s3cret", "abc123", "zz9", "eyJhbGciOi"):
        assert secret not in text
    assert "https://***@host/api" in text
