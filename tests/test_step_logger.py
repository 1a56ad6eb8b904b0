"""StepLogger: window means of the terms, time per step without the paused work, MFU, collapse warnings."""

import logging
import time

import pytest
import torch

from dinov2.utils.logging import StepLogger


class Sink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def make_logger(sink, period=2, collapsed=None):
    return StepLogger(
        logging.getLogger("step_logger_test"),
        [sink],
        period=period,
        max_iter=5,
        global_batch=8,
        peak_flops=1e9,
        peak_label="1 GFLOP/s fp32",
        collapsed_values=collapsed or {},
        n_prototypes=4,
    )


def test_a_window_averages_its_terms_and_leaves_paused_work_out_of_the_timing():
    sink = Sink()
    steps = make_logger(sink)
    schedule = {"lr": 0.1}
    assert steps.step(1, torch.tensor(1.0), {"ibot": torch.tensor(3.0)}, 1e6, schedule) is None
    with steps.paused():
        time.sleep(0.3)  # a checkpoint between steps
    record = steps.step(2, torch.tensor(2.0), {"ibot": torch.tensor(5.0)}, 1e6, schedule)
    assert record is sink.records[-1]
    assert record["loss"] == pytest.approx(1.5) and record["ibot"] == pytest.approx(4.0) and record["lr"] == 0.1
    assert record["time_per_step"] < 0.1  # the 0.3 s pause is not a step's time
    assert record["mfu"] == pytest.approx(2e6 / (2 * record["time_per_step"]) / 1e9)
    assert record["images_per_s"] == pytest.approx(8 / record["time_per_step"])
    assert record["eta_s"] == pytest.approx(3 * record["time_per_step"])
    # the last step closes a window too
    assert steps.step(5, torch.tensor(0.0), {}, 1e6, schedule)["step"] == 5


def test_a_collapsed_term_is_warned_about_once(caplog):
    steps = make_logger(Sink(), period=1, collapsed={"dino_global": 1.25})
    with caplog.at_level(logging.WARNING, logger="step_logger_test"):
        for done in (1, 2):
            steps.step(done, torch.tensor(1.0), {"dino_global": torch.tensor(1.25)}, 1.0, {})
    assert sum("dino_global sits at 1.2500" in r.getMessage() for r in caplog.records) == 1
