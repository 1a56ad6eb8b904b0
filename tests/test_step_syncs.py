"""Host syncs of a training step: the trainer's scalar checks share one all-reduce and one host read,
and nothing else reads a value back from the device except where a shape depends on the data
(the masked patches' token selection) and HCE's label checks. Counted on the CPU by recording every
read of a tensor's value."""

import collections
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, tiny_overrides

from dinov2 import distributed
from dinov2.config.custom_hier import get_tree
from dinov2.layers.token_selection import TokenSelection
from dinov2.train.train import build_grad_scaler, build_model, build_optimizer, train_step
from dinov2.utils.config import load_config
from dinov2.utils.precision import Precision

sys.path.insert(0, str(REPO / "scripts"))
from gpu_check import synthetic_batch  # noqa: E402

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Every read of a tensor's value, as a Counter of ``file:function`` of the reading line."""
    reads = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def recorded(self, *args, _original=original, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]
            reads[f"{Path(frame.filename).name}:{frame.name}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorded)
    return reads


def test_a_paper_step_reads_the_device_only_for_data_dependent_shapes(tmp_path, host_reads, monkeypatch):
    """Before: 16 reads per step (clipping 4, Sinkhorn 2, token selections 6, HCE 3, finiteness 1), and
    in a distributed run two more all-reduces with a read each (pre-emption, finiteness); now 7, and
    one all-reduce for both checks. Gradient clipping (torch's clip_grad_norm_) reads nothing."""
    overrides = tiny_overrides(tmp_path / "unused.csv", **{"student.pretrained_weights": "null"})
    cfg = load_config("hier_vitl14", [*overrides, "crops.local_crops_number=1", "dino.koleo_loss_weight=0.0"])
    precision, cpu = Precision("fp32", "test"), torch.device("cpu")
    model, _ = build_model(cfg, get_tree(cfg.supervised.hierarchy), cpu, 1, precision, load_pretrained=False)
    optimizer, scaler = build_optimizer(model, cfg), build_grad_scaler(precision, cpu)
    batch, supervised = synthetic_batch(cfg, 4, seed=0)
    hyper = dict(step=0, lr=1e-3, wd=0.04, momentum=0.99, teacher_temp=0.07, clip_grad=0.01, frozen=False)
    train_step(model, optimizer, scaler, precision, cpu, batch, supervised, hyper)  # lazy set-up happens once
    host_reads.clear()
    loss, terms, stop = train_step(model, optimizer, scaler, precision, cpu, batch, supervised, hyper)
    assert stop is False and set(terms) == {"dino_global", "ibot", "supervised", "supervised_head"}
    assert dict(host_reads) == {
        "token_selection.py:from_mask": 4,  # the masked patches of the global crops, teacher and student
        "hierarchical_ce.py:<genexpr>": 4,  # the label range (one reduction, two values) per supervised term
        "__init__.py:any_rank_each": 1,  # the trainer's batched checks (finite terms, pre-emption)
    }


def test_a_cls_only_selection_is_made_from_shapes():
    fast = TokenSelection.first_and_patches(None, 3, 7, 1)
    wanted = torch.zeros(3, 7, dtype=torch.bool)
    wanted[:, 0] = True
    slow = TokenSelection.from_mask(wanted)
    for got, want in zip(fast, slow):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


def test_any_rank_each_in_one_process():
    flags = [True, torch.tensor(False), torch.tensor(True), False]
    assert distributed.any_rank_each(flags, torch.device("cpu")) == [True, False, True, False]


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        calls = []
        original = dist.all_reduce
        dist.all_reduce = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
        mine = [[True, False, False], [False, False, True]][rank]
        results[rank] = (
            distributed.any_rank_each([mine[0], torch.tensor(mine[1]), mine[2]], torch.device("cpu")),
            calls,
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_any_rank_each_over_two_ranks_is_one_all_reduce(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
        per_rank = [results[0], results[1]]
    for flags, calls in per_rank:
        assert flags == [True, False, True] and calls == [1]
