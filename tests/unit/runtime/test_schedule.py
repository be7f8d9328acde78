"""Schedule slots: one run per slot, owned by the message that claimed it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from workers.runtime.schedule import claim_slot, claimed_slot
from workers.runtime.settings import Settings

SLOT = dt.datetime(2026, 12, 1, 10, 1, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, process_settings: Callable[..., Settings]) -> str:
    return process_settings(database=request.param).sqlalchemy_url


def test_a_slot_belongs_to_the_message_that_claimed_it(db: str) -> None:
    # Given beat's message claimed the slot
    assert claim_slot("job", SLOT, task_id="m1") is True
    # Then a second beat's message stands aside, and a redelivery of the first goes on
    assert claim_slot("job", SLOT, task_id="m2") is False
    assert claim_slot("job", SLOT, task_id="m1") is True
    # and the redelivery learns its slot even when the clock has moved on
    assert claimed_slot("job", "m1") == SLOT
    assert claimed_slot("job", "m2") is None
    # A claim without a message id is one-shot, as before
    later = SLOT + dt.timedelta(minutes=1)
    assert claim_slot("job", later) is True
    assert claim_slot("job", later) is False
