"""The attention setting (auto | sdpa | xformers) against stand-ins for a working, a broken and a
wrong xformers build. On the CPU, ``_is_cuda`` is faked so that the CUDA-only branch runs; the
stand-ins compute on CPU tensors."""

import logging

import pytest
import torch

from dinov2.errors import ConfigError
from dinov2.layers import attention
from dinov2.layers.attention import set_attention
from dinov2.models import build_backbone


def reference_attention(q, k, v, attn_bias=None):
    """What xformers' memory_efficient_attention computes, ``(B, M, H, K)`` layout."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def broken_build(q, k, v, attn_bias=None):
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ...")


def wrong_build(q, k, v, attn_bias=None):
    return 0.5 * q  # differentiable, but not attention


@pytest.fixture
def fake_gpu(monkeypatch):
    """Tensors count as CUDA tensors; ``install(fn)`` makes ``fn`` the xformers kernel and counts its calls."""
    monkeypatch.setattr(attention, "_is_cuda", lambda x: True)
    attention.xformers_problem.cache_clear()
    attention._warn_fallback.cache_clear()
    calls = []

    def install(kernel):
        def counted(*args, **kwargs):
            calls.append(args[0].shape)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(attention, "memory_efficient_attention", counted)
        return calls

    yield install
    attention.xformers_problem.cache_clear()
    attention._warn_fallback.cache_clear()


def _model(setting):
    torch.manual_seed(0)
    model = build_backbone("vit_test").eval()
    return set_attention(model, setting)


def _forward(model, images):
    with torch.no_grad():
        return model.forward_features(images)["x_prenorm"]


IMAGES = torch.randn(2, 3, 28, 28)


def test_auto_falls_back_to_sdpa_loudly_after_one_failing_call(fake_gpu, caplog):
    calls = fake_gpu(broken_build)
    expected = _forward(_model("sdpa"), IMAGES)
    model = _model("auto")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        first = _forward(model, IMAGES)
        second = _forward(model, IMAGES)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert len(calls) == 1, "the check calls xformers once; every later attention goes to SDPA"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No operator found" in warnings[0] and "SDPA" in warnings[0]


def test_auto_uses_a_working_xformers(fake_gpu):
    calls = fake_gpu(reference_attention)
    expected = _forward(_model("sdpa"), IMAGES)
    torch.testing.assert_close(_forward(_model("auto"), IMAGES), expected)
    assert len(calls) == 1 + 2  # the check, then both blocks


def test_auto_falls_back_when_xformers_computes_something_else(fake_gpu, caplog):
    fake_gpu(wrong_build)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        out = _forward(_model("auto"), IMAGES)
    torch.testing.assert_close(out, _forward(_model("sdpa"), IMAGES))
    assert "differs from SDPA" in caplog.text


def test_explicit_xformers_that_fails_names_the_cause(fake_gpu):
    fake_gpu(broken_build)
    with pytest.raises(ConfigError, match="student.attention=xformers.*No operator found.*auto or sdpa"):
        _forward(_model("xformers"), IMAGES)


def test_sdpa_never_calls_xformers(fake_gpu):
    calls = fake_gpu(broken_build)
    _forward(_model("sdpa"), IMAGES)
    assert calls == []


def test_xformers_is_refused_for_cpu_tensors(monkeypatch):
    monkeypatch.setattr(attention, "memory_efficient_attention", reference_attention)
    with pytest.raises(ConfigError, match="xformers needs CUDA"):
        _forward(_model("xformers"), IMAGES)


def test_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, sdpa, xformers.*'flash'"):
        set_attention(build_backbone("vit_test"), "flash")


def test_the_trainer_applies_student_attention(tmp_path):
    from conftest import tiny_overrides

    from dinov2.config.custom_hier import get_tree
    from dinov2.train.train import build_model
    from dinov2.utils.config import load_config
    from dinov2.utils.precision import Precision

    cfg = load_config("demo", tiny_overrides(tmp_path / "unused.csv", **{"student.attention": "sdpa"}))
    tree, cpu = get_tree(cfg.supervised.hierarchy), torch.device("cpu")
    model, _ = build_model(cfg, tree, cpu, 1, Precision("fp32", "test"), load_pretrained=False)
    settings = {m.attention for m in model.modules() if isinstance(m, attention.Attention)}
    assert settings == {"sdpa"}
