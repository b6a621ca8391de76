"""Long work is never silent: off a terminal, progress is one log line every few seconds with the
count, rate and ETA; a short loop stays quiet; ``enabled=False`` is silent."""

from __future__ import annotations

import logging

from uad.progress import LogProgress, progress


def test_log_lines_carry_count_rate_and_eta(caplog):
    with caplog.at_level(logging.INFO, logger="uad.progress"):
        bar = LogProgress(total=4, desc="dinomaly:train", unit="step", every=0.0)
        for _ in range(4):
            bar.set_postfix(loss="0.1234")
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("dinomaly:train: 1/4 step (25 %)") and "step/s" in lines[0] and "ETA" in lines[0]
    assert "loss 0.1234" in lines[0]
    assert lines[-1].startswith("dinomaly:train: 4/4 step (100 %)") and "done in" in lines[-1]


def test_short_loops_and_disabled_progress_stay_quiet(caplog, monkeypatch):
    monkeypatch.setattr("uad.progress.interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="uad.progress"):
        assert list(progress(range(3), desc="quick", every=3600)) == [0, 1, 2]
        assert list(progress(range(3), desc="off", enabled=False, every=0.0)) == [0, 1, 2]
    assert not caplog.records
