"""Start weights that need a download fail at once, naming the file, on a node that cannot download."""

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_train, tiny_overrides

from dinov2.errors import CheckpointError
from dinov2.models.download_check import check_download_possible, connection_problem, download_url
from dinov2.models.weights import PRESETS, cached_path

DINOBLOOM_L = PRESETS["dinobloom_l"].url


@pytest.fixture
def connections(monkeypatch):
    """Every TCP connection attempt as (host, port); ``refuse`` makes them fail."""
    attempts, behaviour = [], {"refuse": True, "delay": 0.0}

    class Connection:
        def close(self):
            pass

    def create_connection(address, timeout=None):
        attempts.append(address)
        time.sleep(behaviour["delay"])
        if behaviour["refuse"]:
            raise OSError(101, "Network is unreachable")
        return Connection()

    monkeypatch.setattr(socket, "create_connection", create_connection)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return attempts, behaviour


def test_an_offline_node_names_the_file_and_where_to_put_it(connections, tmp_path):
    attempts, _ = connections
    with pytest.raises(CheckpointError) as caught:
        check_download_possible("dinobloom_l", cache_dir=tmp_path)
    message = str(caught.value)
    target = cached_path(DINOBLOOM_L, tmp_path)
    assert f"student.pretrained_weights=dinobloom_l must be downloaded from {DINOBLOOM_L}" in message
    assert f"curl -L --create-dirs -o {target} {DINOBLOOM_L}" in message
    assert "Network is unreachable" in message and "student.pretrained_weights=/path/to/DinoBloom-L.pth" in message
    assert attempts == [("zenodo.org", 443)]


def test_a_cached_file_or_a_local_path_needs_no_network(connections, tmp_path):
    attempts, _ = connections
    target = cached_path(DINOBLOOM_L, tmp_path)
    target.write_bytes(b"weights")
    check_download_possible("dinobloom_l", cache_dir=tmp_path)
    check_download_possible(str(target))
    check_download_possible("")
    assert attempts == [] and download_url(str(target)) is None


def test_a_reachable_host_passes(connections, tmp_path):
    attempts, behaviour = connections
    behaviour["refuse"] = False
    check_download_possible("https://example.org:8443/weights.pth", cache_dir=tmp_path)
    assert attempts == [("example.org", 8443)]


def test_the_proxy_is_what_must_answer(connections, monkeypatch):
    attempts, _ = connections
    monkeypatch.setenv("https_proxy", "http://proxy.cluster:3128")
    assert "(the proxy)" in connection_problem(DINOBLOOM_L)
    assert attempts == [("proxy.cluster", 3128)]


def test_a_host_that_never_answers_is_given_up_after_the_timeout(connections):
    _, behaviour = connections
    behaviour["delay"] = 5.0
    start = time.monotonic()
    assert "no answer within 0.2 s" in connection_problem(DINOBLOOM_L, timeout_s=0.2)
    assert time.monotonic() - start < 2


@pytest.fixture
def offline_env(tmp_path):
    """A node whose only way out is a proxy that never answers (a listening socket whose one-place
    backlog is taken: further connections hang, as behind a firewall that drops packets), and an
    empty weights cache. A download there hangs for minutes (the kernel's SYN retries)."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        filler.connect(server.getsockname())
        proxy = "http://{}:{}".format(*server.getsockname())
        yield {**os.environ, "https_proxy": proxy, "HTTPS_PROXY": proxy, "DINO_HIER_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow
def test_the_trainer_fails_at_once_with_the_message(tmp_path, offline_env):
    overrides = tiny_overrides(tmp_path / "unused.csv", **{"student.pretrained_weights": "dinobloom_l"})
    start = time.monotonic()
    done = run_train(tmp_path / "out", overrides, env=offline_env, timeout=120)
    assert time.monotonic() - start < 90  # start-up + the 5 s connect check, not a hanging download
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "DinoBloom-L.pth" in done.stderr and "curl" in done.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_fails_before_any_collective(tmp_path, offline_env):
    """2 ranks: both stop with the message; none waits in a collective for rank 0's hanging download."""
    overrides = tiny_overrides(tmp_path / "unused.csv", **{"student.pretrained_weights": "dinobloom_l"})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "dinov2.train.train", "--output-dir", str(tmp_path / "out"), *overrides]
    env = {**offline_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert time.monotonic() - start < 120
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert log.count("must be downloaded from") >= 2, log[-4000:]  # each rank says it
