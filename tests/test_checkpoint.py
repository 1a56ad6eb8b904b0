"""Checkpoint loading: DINOv2, DinoBloom, training-checkpoint formats, pos_embed resampling, clear
errors for wrong architectures and pickled code, URL cache, presets (no network anywhere)."""

import hashlib
import io
import math
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from dinov2.errors import CheckpointError
from dinov2.models import build_backbone
from dinov2.models.weights import (
    PRESETS,
    cached_path,
    download,
    load_pretrained,
    pretrained_arch,
    read_checkpoint,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open an http(s) URL fails the test."""
    real_urlopen = urllib.request.urlopen

    def guarded(url, *args, **kwargs):
        assert str(url).startswith("file:"), f"network access attempted: {url}"
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


def randomized(model):
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def offset_resample(pos_embed, rows, cols):
    """DINOv2: bicubic, scale factor (n + 0.1) / M, no antialiasing; cls entry kept."""
    dim = pos_embed.shape[-1]
    side = math.isqrt(pos_embed.shape[1] - 1)
    grid = pos_embed[0, 1:].reshape(side, side, dim).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid[0].permute(1, 2, 0).reshape(1, rows * cols, dim)], dim=1)


def assert_same_weights(model, state, skip=("pos_embed",)):
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        if key not in skip:
            assert torch.equal(own[key], value), key


def test_official_dinov2_file_at_518_runs_like_dinov2_at_224(tmp_path):
    official = randomized(build_backbone("vit_test", img_size=518))
    assert official.pos_embed.shape == (1, 1370, 32)
    path = tmp_path / "dinov2_vitt14_pretrain.pth"
    torch.save(official.state_dict(), path)

    model = load_pretrained(build_backbone("vit_test", img_size=224).eval(), path)
    assert_same_weights(model, official.state_dict())
    torch.testing.assert_close(model.pos_embed.detach(), offset_resample(official.pos_embed.detach(), 16, 16))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # DINOv2 resamples on the fly at 224; the loaded 224 model must agree
        torch.testing.assert_close(model(images), official(images), rtol=0, atol=1e-5)


def test_register_model_file_uses_size_based_antialiased_resampling(tmp_path):
    layout = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    official = randomized(build_backbone("vit_test", img_size=518, **layout))
    path = tmp_path / "reg.pth"
    torch.save(official.state_dict(), path)
    model = load_pretrained(build_backbone("vit_test", img_size=98, **layout).eval(), path)
    images = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        torch.testing.assert_close(model(images), official(images), rtol=0, atol=1e-5)


def test_dinobloom_teacher_format_drops_heads(tmp_path):
    source = randomized(build_backbone("vit_test", img_size=224))
    teacher = {f"backbone.{key}": value for key, value in source.state_dict().items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(64, 32)
    teacher["dino_head.last_layer.weight_g"] = torch.ones(128, 1)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(64, 32)
    path = tmp_path / "DinoBloom-T.pth"
    torch.save({"teacher": teacher}, path)

    model = load_pretrained(build_backbone("vit_test", img_size=224), path)
    assert_same_weights(model, source.state_dict(), skip=())
    smaller = load_pretrained(build_backbone("vit_test", img_size=98), path)
    torch.testing.assert_close(smaller.pos_embed.detach(), offset_resample(source.pos_embed.detach(), 7, 7))


def test_training_checkpoint_prefers_teacher(tmp_path):
    student = randomized(build_backbone("vit_test"))
    teacher = randomized(build_backbone("vit_test"))
    model_state = {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    model_state.update({f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()})
    model_state["student.dino_head.mlp.0.weight"] = torch.randn(8, 32)
    model_state["supervised_head.weight"] = torch.randn(5, 32)
    path = tmp_path / "model_0000100.rank_0.pth"
    torch.save({"model": model_state, "optimizer": {"state": {}}, "step": 100}, path)
    assert_same_weights(load_pretrained(build_backbone("vit_test"), path), teacher.state_dict(), skip=())


def test_block_chunked_keys_are_flattened(tmp_path):
    source = randomized(build_backbone("vit_test", depth=4))
    chunked = {}
    for key, value in source.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{key[len('blocks.') :]}"  # block_chunks=2: blocks.<chunk>.<index>.*
        chunked[key] = value
    assert "blocks.1.3.attn.qkv.weight" in chunked
    path = tmp_path / "chunked.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in chunked.items()}}, path)
    assert_same_weights(load_pretrained(build_backbone("vit_test", depth=4), path), source.state_dict(), skip=())


def test_wrong_arch_names_misshaped_keys_with_shapes_and_hints_the_arch(tmp_path):
    path = tmp_path / "vitt.pth"
    torch.save(build_backbone("vit_test").state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(build_backbone("vit_test", embed_dim=48, depth=3), path)
    message = str(error.value)
    assert "mis-shaped" in message and "cls_token (1, 1, 32) vs (1, 1, 48)" in message
    assert "patch_embed.proj.weight (32, 3, 14, 14) vs (48, 3, 14, 14)" in message
    assert "embed_dim 32, depth 2 (vit_test)" in message
    assert "missing keys: blocks.2.attn.proj.bias" in message and str(path) in message


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = tmp_path / "registers_swiglu.pth"
    torch.save(build_backbone("vit_test", num_register_tokens=4, ffn_layer="swiglufused").state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(build_backbone("vit_test"), path)
    message = str(error.value)
    assert "unexpected keys: register_tokens, blocks.{0-1}.mlp.w12.bias" in message
    assert "missing keys: blocks.{0-1}.mlp.fc1.bias" in message
    assert "fused SwiGLU FFN, 4 register tokens" in message


def test_vit_base_file_into_vit_large_fails_clearly(tmp_path):
    with torch.device("meta"):
        base_shapes = {k: v.shape for k, v in build_backbone("vit_base").state_dict().items()}
    path = tmp_path / "vitb.pth"
    torch.save({k: torch.zeros(s) for k, s in base_shapes.items() if not k.startswith("blocks.")}, path)
    with pytest.raises(CheckpointError, match=r"cls_token \(1, 1, 768\) vs \(1, 1, 1024\)"):
        load_pretrained(build_backbone("vit_test", embed_dim=1024, depth=1, num_heads=16), path)


class _Callable:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_callable_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 32), "hook": _Callable()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_pretrained(build_backbone("vit_test"), path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_unreadable_and_non_dict_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_checkpoint(garbage)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a dict"):
        read_checkpoint(tensor)


def test_missing_local_path_is_an_error_without_network(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth.*not found"):
        load_pretrained(build_backbone("vit_test"), tmp_path / "missing.pth")


def test_file_url_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    source = randomized(build_backbone("vit_test"))
    remote = tmp_path / "remote" / "weights.pth"
    remote.parent.mkdir()
    torch.save(source.state_dict(), remote)
    url = remote.as_uri()
    monkeypatch.setenv("DINO_HIER_CACHE", str(tmp_path / "cache"))

    load_pretrained(build_backbone("vit_test"), url)
    cached = cached_path(url)
    assert cached.parent == tmp_path / "cache" and cached.name.endswith("-weights.pth")
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name, cached.name + ".sha256"]
    remote.unlink()  # the second load must come from the cache
    assert_same_weights(load_pretrained(build_backbone("vit_test"), url), source.state_dict(), skip=())


def test_failed_download_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot download.*local path"):
        read_checkpoint((tmp_path / "nowhere.pth").as_uri(), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []  # nothing left behind


def _served(tmp_path, content: bytes) -> str:
    remote = tmp_path / "remote" / "weights.pth"
    remote.parent.mkdir(exist_ok=True)
    remote.write_bytes(content)
    return remote.as_uri()


def _weights_bytes(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def test_a_damaged_cached_download_is_fetched_again(tmp_path):
    source = randomized(build_backbone("vit_test"))
    url = _served(tmp_path, _weights_bytes(source))
    cache = tmp_path / "cache"
    cached = download(url, cache)
    record = cached.with_name(cached.name + ".sha256").read_text().split()
    assert record == [hashlib.sha256(cached.read_bytes()).hexdigest(), str(cached.stat().st_size)]
    cached.write_bytes(cached.read_bytes()[:500])  # truncated on disk after the download
    assert_same_weights(load_pretrained(build_backbone("vit_test"), url, cache), source.state_dict(), skip=())


def test_a_bad_file_from_the_source_is_not_kept_in_the_cache(tmp_path):
    url = _served(tmp_path, b"<html>502 Bad Gateway</html>")
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=r"downloaded from .*weights.pth.*cached copy was removed"):
        load_pretrained(build_backbone("vit_test"), url, cache)
    assert list(cache.iterdir()) == []
    source = randomized(build_backbone("vit_test"))
    _served(tmp_path, _weights_bytes(source))  # the source is fixed: the next run gets the good file
    assert_same_weights(load_pretrained(build_backbone("vit_test"), url, cache), source.state_dict(), skip=())


def test_a_cut_off_transfer_is_an_error(tmp_path, monkeypatch):
    url = _served(tmp_path, b"x" * 3000)
    real_urlopen = urllib.request.urlopen

    def short_response(address):
        response = real_urlopen(address)
        response.headers.replace_header("Content-Length", "5000")
        return response

    monkeypatch.setattr(urllib.request, "urlopen", short_response)
    with pytest.raises(CheckpointError, match=r"stopped after 3000 of 5000 bytes"):
        download(url, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_preset_resolves_through_the_cache(tmp_path):
    source = randomized(build_backbone("vit_test"))
    cached = cached_path(PRESETS["dinobloom_s"].url, tmp_path)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, cached)
    model = load_pretrained(build_backbone("vit_test"), "dinobloom_s", cache_dir=tmp_path)
    assert_same_weights(model, source.state_dict(), skip=())


@pytest.mark.parametrize(
    "preset, arch, tokens, dim, registers, ffn_weight",
    [
        ("dinov2_vits14", "vit_small", 1370, 384, 0, ("blocks.0.mlp.fc1.weight", (1536, 384))),
        ("dinov2_vitl14_reg", "vit_large", 1370, 1024, 4, ("blocks.23.mlp.fc2.weight", (1024, 4096))),
        ("dinov2_vitg14", "vit_giant2", 1370, 1536, 0, ("blocks.39.mlp.w12.weight", (8192, 1536))),
        ("dinobloom_l", "vit_large", 257, 1024, 0, ("blocks.0.mlp.fc1.weight", (4096, 1024))),
        ("dinobloom_g", "vit_giant2", 257, 1536, 0, ("blocks.0.mlp.w3.weight", (1536, 4096))),
    ],
)
def test_presets_carry_their_layout(preset, arch, tokens, dim, registers, ffn_weight):
    config = pretrained_arch(preset)
    assert config["arch"] == arch
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_backbone(**config).state_dict().items()}
    assert shapes["pos_embed"] == (1, tokens, dim)
    assert shapes.get("register_tokens", (1, 0, dim)) == (1, registers, dim)
    assert shapes[ffn_weight[0]] == ffn_weight[1]


def test_preset_urls_and_unknown_preset():
    assert (
        PRESETS["dinov2_vitb14"].url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
    )
    assert PRESETS["dinov2_vits14_reg"].url.endswith("/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth")
    assert PRESETS["dinobloom_b"].url == "https://zenodo.org/records/10908163/files/DinoBloom-B.pth"
    assert len(PRESETS) == 12
    with pytest.raises(CheckpointError, match="dinobloom_xl"):
        pretrained_arch("dinobloom_xl")
