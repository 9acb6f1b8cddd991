"""Tuning vs test users: a fixed split by user id that does not move when users are added."""

import pytest

from fedtune.personalization.users import select_users, split_users


def test_the_split_is_fixed_by_user_id_and_stable_when_users_are_added():
    users = [f"user-{i}" for i in range(200)]
    split = split_users(users, 0.3)
    assert set(split.tuning).isdisjoint(split.test) and set(split.tuning) | set(split.test) == set(users)
    assert 0.2 < len(split.tuning) / len(users) < 0.4
    more = split_users(users + [f"new-{i}" for i in range(50)], 0.3)
    assert set(split.tuning) <= set(more.tuning) and set(split.test) <= set(more.test)
    assert split_users(list(reversed(users)), 0.3).tuning == tuple(reversed(split.tuning))


def test_select_users_and_bad_input():
    users = [f"u{i}" for i in range(50)]
    assert select_users(users, "all", 0.3) == users
    assert select_users(users, "test", 0.3, limit=3) == list(split_users(users, 0.3).test[:3])
    assert select_users(users, "test", 0.0) == users
    with pytest.raises(ValueError, match="expected test, tuning or all"):
        select_users(users, "some", 0.3)
