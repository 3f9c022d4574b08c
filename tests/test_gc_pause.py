"""The collector settings a wide fan-out changes are restored, however fan-outs overlap."""

from __future__ import annotations

import gc

from rlm_async._gc import MIN_PROMPTS, YOUNG_THRESHOLD, long_lived_frozen


class TestLongLivedFrozen:
    def test_overlapping_fan_outs_restore_the_settings(self) -> None:
        """Two fan-outs that start and end out of order leave thresholds and freeze as found."""
        before, frozen = gc.get_threshold(), gc.get_freeze_count()
        first, second = long_lived_frozen(MIN_PROMPTS), long_lived_frozen(MIN_PROMPTS)
        first.__enter__()
        assert gc.get_threshold()[0] >= YOUNG_THRESHOLD
        second.__enter__()
        first.__exit__(None, None, None)
        assert gc.get_threshold()[0] >= YOUNG_THRESHOLD  # one still running
        second.__exit__(None, None, None)
        assert gc.get_threshold() == before and gc.get_freeze_count() == frozen

    def test_narrow_fan_outs_are_left_alone(self) -> None:
        """Below MIN_PROMPTS nothing changes."""
        before = gc.get_threshold()
        with long_lived_frozen(MIN_PROMPTS - 1):
            assert gc.get_threshold() == before
