"""Precision ``auto`` follows the hardware: tested with the capabilities faked both ways."""

import logging

import pytest
import torch

from dinov2.errors import ConfigError
from dinov2.utils import precision
from dinov2.utils.precision import choose_precision

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def cpu_speedup(monkeypatch):
    """Fake the measured bf16/fp32 matmul speed ratio of this CPU."""

    def fake(value):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: value)
        precision._warn_if_slow_bf16.cache_clear()

    yield fake
    precision._warn_if_slow_bf16.cache_clear()


@pytest.fixture
def caplog(caplog, monkeypatch):
    """pytest's caplog, also after a trainer in this process has stopped the "dinov2" logger propagating."""
    monkeypatch.setattr(logging.getLogger("dinov2"), "propagate", True)
    return caplog


@pytest.fixture
def fake_cuda(monkeypatch):
    def fake(bf16: bool):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")

    return fake


@pytest.mark.parametrize("speedup, expected", [(4.2, "bf16"), (1.6, "bf16"), (1.2, "fp32"), (0.015, "fp32")])
def test_auto_on_the_cpu_takes_bf16_only_where_it_is_clearly_faster(cpu_speedup, speedup, expected):
    cpu_speedup(speedup)
    chosen = choose_precision("auto", CPU)
    assert chosen.name == expected
    assert chosen.reason.startswith("auto: ") and f"{speedup:.2f}x fp32" in chosen.reason
    assert chosen.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    assert not chosen.needs_loss_scaler


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_takes_bf16_where_supported_else_fp16_with_a_scaler(fake_cuda, bf16, expected):
    fake_cuda(bf16)
    chosen = choose_precision("auto", CUDA)
    assert chosen.name == expected and "Fake GPU" in chosen.reason
    assert chosen.needs_loss_scaler == (expected == "fp16")


def test_an_explicit_setting_wins(cpu_speedup, fake_cuda):
    cpu_speedup(4.0)
    assert choose_precision("fp32", CPU).name == "fp32"
    fake_cuda(True)
    assert choose_precision("fp16", CUDA).name == "fp16"
    assert choose_precision("fp32", CUDA).reason == "set explicitly"


def test_explicit_bf16_on_a_slow_bf16_cpu_runs_but_warns_once_with_the_factor(cpu_speedup, caplog):
    cpu_speedup(0.015)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert choose_precision("bf16", CPU).name == "bf16"
        choose_precision("bf16", CPU)
    warnings = [r.getMessage() for r in caplog.records if "bf16 was set explicitly" in r.getMessage()]
    assert len(warnings) == 1 and "67x slower than fp32" in warnings[0]


def test_explicit_bf16_on_a_fast_bf16_cpu_does_not_warn(cpu_speedup, caplog):
    cpu_speedup(4.0)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        choose_precision("bf16", CPU)
    assert not caplog.records


def test_fp16_on_the_cpu_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        choose_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="auto, fp32, bf16, fp16.*'float16'"):
        choose_precision("float16", CPU)


def test_autocast_is_a_no_op_in_fp32_and_casts_matmuls_in_bf16():
    x = torch.randn(4, 4)
    with precision.Precision("fp32", "test").autocast(CPU):
        assert (x @ x).dtype == torch.float32
    with precision.Precision("bf16", "test").autocast(CPU):
        assert (x @ x).dtype == torch.bfloat16


def test_the_measured_speedup_is_positive_and_measured_once():
    precision.cpu_bf16_speedup.cache_clear()
    first = precision.cpu_bf16_speedup()
    assert first > 0 and precision.cpu_bf16_speedup() == first
    assert precision.cpu_bf16_speedup.cache_info().misses == 1
