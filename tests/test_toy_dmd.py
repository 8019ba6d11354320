"""Experiment B's small mode (experiments/toy_dmd_2d.py): the properties of the full run that already hold at its
size, each able to fail."""

from __future__ import annotations

import numpy as np

from experiments import toy_dmd_2d


def test_small_toy_dmd2_student_keeps_every_mode_and_backward_simulation_beats_noised_data():
    results = toy_dmd_2d.run(small=True, log=lambda line: None)["B"]
    floor = results["teacher, 50 steps (other seeds: the floor)"]
    student = results["DMD2 student, 8 steps (backward simulation, TTUR 5)"]
    noised = results["student, noised real data instead of backward simulation"]
    # The 8-step student covers all 8 modes and lands within ~2x of the teacher's own seed noise (measured over 4
    # seeds: 0.012-0.020 against a floor of 0.008-0.016; 8-step Euler 0.007-0.033, so the student is not
    # asserted to beat it: on this toy it does not, robustly).
    assert np.all(student["mode_coverage"] == 1.0)
    assert np.all(student["energy_distance"] < 0.04)
    assert np.all(floor["energy_distance"] < 0.03)
    # Training on noised real data instead of the student's own rollouts (what inference sees) is far worse
    # (measured 3.0x to 6.8x the student's distance on each of 4 seeds).
    assert np.all(noised["energy_distance"] > 2 * student["energy_distance"])
