"""train/startup.py: start-up phases add up when entered twice, a nested phase's time is not its
parent's, and each log line names the phase (and the part of it) that ended. A fake clock: no timing."""
from __future__ import annotations

import logging

import train.startup as startup


def test_phases_add_up_and_each_line_names_its_part(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(startup.time, "perf_counter", lambda: now[0])
    caplog.set_level(logging.INFO, logger="scaletrain")
    phases = startup.Phases()
    with phases.phase("build"):
        now[0] += 2.0
    with phases.phase("build", "adapter"):
        now[0] += 1.0
        with phases.phase("load"):
            now[0] += 5.0
    assert phases.seconds["build"] == 3.0 and phases.seconds["load"] == 5.0  # both entries, without the load
    lines = [r.getMessage().split(" (peak")[0] for r in caplog.records]
    assert lines == ["start-up: build took 2.00 s", "start-up: load took 5.00 s",
                     "start-up: build (adapter) took 6.00 s"]
