"""atomic_write and output_folder: the old content or the new one, never a stale temporary file;
disk and path problems become an OutputError naming the file."""

import errno
import os
import resource
import signal

import pytest
import torch
from conftest import cli_exit, make_demo_data, run_train, tiny_overrides
from PIL import Image

from dinov2.data import make_manifest
from dinov2.errors import OutputError
from dinov2.eval import eval_hier
from dinov2.train import train
from dinov2.train.checkpointing import list_checkpoints
from dinov2.utils.io import atomic_write, output_folder


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "state.pth"
    with atomic_write(target) as handle:
        torch.save({"x": torch.arange(3)}, handle)
    with atomic_write(tmp_path / "notes.txt", "w") as handle:
        handle.write("one\ntwo\n")
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(3))
    assert (tmp_path / "notes.txt").read_bytes() == b"one\ntwo\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "state.pth", "sub"]


def test_a_failure_inside_keeps_the_old_content_and_no_temporary_file(tmp_path):
    target = tmp_path / "m.csv"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic_write(target, "w") as handle:
            handle.write("half of the new")
            raise KeyError("a bug in the caller keeps its type")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["m.csv"]


def test_a_full_disk_is_an_output_error_naming_the_file(tmp_path):
    target = tmp_path / "checkpoint_0000010.pth"
    with pytest.raises(OutputError, match=r"cannot write .*checkpoint_0000010.pth: No space left on device"):
        with atomic_write(target) as handle:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_bad_output_paths(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match=r"--output-dir .*a_file is a file, not a folder"):
        output_folder(tmp_path / "a_file")
    with pytest.raises(OutputError, match=r"--out .*a_file/x cannot be used as an output folder: Not a directory"):
        output_folder(tmp_path / "a_file" / "x", "--out")
    with pytest.raises(OutputError, match=r"/proc/dino_hier_run cannot be used as an output folder"):
        output_folder("/proc/dino_hier_run")
    (tmp_path / "taken.csv").mkdir()
    with pytest.raises(OutputError, match=r"cannot write .*taken.csv"):
        with atomic_write(tmp_path / "taken.csv", "w") as handle:
            handle.write("path,label\n")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "taken.csv"]
    assert output_folder(tmp_path / "new" / "run") == tmp_path / "new" / "run" and (tmp_path / "new/run").is_dir()


@pytest.mark.parametrize("output_dir", ["/proc/dino_hier_run", "FILE"])
def test_train_refuses_an_unusable_output_dir_without_a_traceback(tmp_path, capsys, output_dir):
    if output_dir == "FILE":
        output_dir = tmp_path / "model.pth"
        output_dir.write_text("not a folder")
    code, err = cli_exit(train.main, ["--output-dir", output_dir, *tiny_overrides(tmp_path / "unused.csv")], capsys)
    assert code == 2 and str(output_dir) in err and "Traceback" not in err


def test_eval_hier_refuses_an_output_dir_where_a_file_stands(tmp_path, capsys):
    (tmp_path / "report").write_text("a file")
    argv = ["--model", tmp_path / "model.pth", "--data", tmp_path / "m.csv", "--output-dir", tmp_path / "report"]
    code, err = cli_exit(eval_hier.main, argv, capsys)
    assert code == 2 and "--output-dir" in err and "report is a file, not a folder" in err and "Traceback" not in err


def _small_file_limit():
    """Files over 64 KiB cannot be written (EFBIG, as on a full disk), and the signal is ignored."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.slow
def test_training_on_a_full_disk_stops_with_a_message_and_no_stale_temporary_file(tmp_path):
    manifest = make_demo_data(tmp_path / "data")
    out = tmp_path / "run"
    result = run_train(
        out, tiny_overrides(manifest, **{"train.max_iters": 2}), timeout=240, preexec_fn=_small_file_limit
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot write" in result.stderr and "checkpoint_0000002.pth" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list_checkpoints(out) and not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_make_manifest_into_a_file_path_is_refused(tmp_path, capsys):
    (tmp_path / "root/NGS").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "root/NGS/a.png")
    (tmp_path / "notdir").write_text("x")
    argv = ["--dataset", "matek_2019", "--root", tmp_path / "root", "--out", tmp_path / "notdir" / "m.csv"]
    code, err = cli_exit(make_manifest.main, argv, capsys)
    assert code == 2 and "notdir/m.csv: " in err and "notdir is a file, not a folder" in err and "Traceback" not in err
