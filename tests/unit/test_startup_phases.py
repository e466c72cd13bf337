"""train/startup.py: start-up phases add up when entered twice, a nested phase's time is not its
parent's, and each log line names the phase (and the part of it) that ended."""
from __future__ import annotations

import logging
import time

from train.startup import Phases


def test_phases_add_up_and_each_line_names_its_part(caplog):
    caplog.set_level(logging.INFO, logger="scaletrain")
    phases = Phases()
    with phases.phase("build"):
        time.sleep(0.02)
    with phases.phase("build", "adapter"):
        time.sleep(0.02)
        with phases.phase("load"):
            time.sleep(0.05)
    assert 0.04 <= phases.seconds["build"] < 0.09  # both entries, without the nested load
    assert phases.seconds["load"] >= 0.05
    lines = [r.getMessage().split(" took ")[0] for r in caplog.records]
    assert lines == ["start-up: build", "start-up: load", "start-up: build (adapter)"]
