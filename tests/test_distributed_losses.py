"""The losses' cross-rank reductions (gloo, 2 CPU processes): the teacher targets computed on
rows split unevenly over ranks (or all on one: a rank's batch without masked patches) equal
those of one process holding every row."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from dinov2.loss.dino_clstoken_loss import DINOLoss
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.teacher_centering import sinkhorn_knopp


def _logits():
    torch.manual_seed(0)
    logits = torch.randn(8, 6, dtype=torch.float64) * 2.0
    logits[6] -= 40.0  # a sample far below every prototype's maximum (rank 1)
    return logits


def _targets(logits):
    """What each term gets from its teacher logits; on several ranks, for this rank's rows."""
    dino, ibot = DINOLoss(6), iBOTPatchLoss(6)
    n_masked = torch.tensor([float(logits.shape[0])], dtype=torch.float64)
    out = {
        "sinkhorn": sinkhorn_knopp(logits, 0.1, n_iterations=3),
        "sinkhorn_masked": ibot.sinkhorn_knopp_teacher(logits, 0.1, n_masked),
    }
    dino.update_center(logits.float())
    ibot.update_center(logits.float())
    out["dino_center"], out["ibot_center"] = dino.center.clone(), ibot.center.clone()
    return out


def _rank(rank: int, port: int, splits, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        start, stop = splits[rank]
        results[rank] = _targets(_logits()[start:stop])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("splits", [((0, 5), (5, 8)), ((0, 0), (0, 8))], ids=["5+3 rows", "0+8 rows"])
def test_teacher_targets_on_rows_split_over_two_ranks_equal_one_process(splits, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the spawned ranks; restored afterwards
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), splits, results), nprocs=2, join=True)
        per_rank = [results[0], results[1]]
    whole = _targets(_logits())
    for key in ("sinkhorn", "sinkhorn_masked"):
        torch.testing.assert_close(torch.cat([r[key] for r in per_rank]), whole[key])
    assert whole["sinkhorn"][6].sum() > 0.99  # the far-below sample keeps its row on either layout
    for key in ("dino_center", "ibot_center"):  # the EMA of the mean over every rank's rows
        for part in per_rank:
            torch.testing.assert_close(part[key], whole[key])
