"""The shared health rule: up after one passing probe, down after ``limit`` failed in a row."""

from __future__ import annotations

from exo_nixos.hysteresis import UpDown


def test_up_after_one_pass_down_after_limit_failures_in_a_row():
    health = UpDown(3)
    assert not health.up
    assert health.passed() is True and health.up
    assert health.passed() is False  # no change
    assert [health.failed_probe() for _ in range(3)] == [False, False, True]
    assert not health.up and health.failing and health.failed == 3
    assert health.failed_probe() is False  # already down
    assert health.passed() is True and health.failed == 0 and not health.failing


def test_a_pass_between_failures_starts_the_count_again():
    health = UpDown(2)
    health.passed()
    health.failed_probe()
    health.passed()
    assert health.failed_probe() is False and health.up


def test_failures_before_the_first_pass_change_nothing_until_it():
    health = UpDown(1)
    assert health.failed_probe() is False and not health.up
    assert health.passed() is True


def test_give_up_is_down_at_once_as_if_limit_probes_failed():
    health = UpDown(3)
    health.passed()
    health.failed_probe()
    health.give_up()
    assert not health.up and health.failed == 3 and health.failing
    health.give_up()
    assert health.failed == 3
