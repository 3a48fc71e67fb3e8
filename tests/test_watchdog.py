"""The fp16 watchdog's rules (its stop in a real run is in test_tracking.py)."""

from bertscale.watchdog import LossScaleWatchdog


def test_watchdog_rules():
    fp16 = {"fp16": {"enabled": True, "min_loss_scale": 1}}
    dog = LossScaleWatchdog(fp16, window=10)
    assert dog.check(2.0**10, True) is None  # one overflow: normal back-off
    assert "fell to its minimum (1)" in dog.check(1.0, True)
    assert LossScaleWatchdog(fp16, window=10).check(1.0, False) is None  # at min but learning

    dog = LossScaleWatchdog(fp16, window=10)
    results = [dog.check(2.0**12, skipped) for skipped in [True, False] * 3 + [True] * 4]
    assert results[:-1] == [None] * 9 and "70% of the last 10 steps" in results[-1]
    assert "--bf16" in results[-1] and "--learning-rate" in results[-1]

    bf16 = LossScaleWatchdog({"bf16": {"enabled": True}}, window=2)
    assert [bf16.check(None, True) for _ in range(5)] == [None] * 5
