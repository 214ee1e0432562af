"""Loss values against hand-computed numbers; the global-batch gradient on 2 real processes."""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from harma.config import LossConfig
from harma.model.losses import (
    contrastive_loss,
    harma_loss,
    uniformity_loss,
    weighted_triplet_loss,
)


def test_contrastive_two_samples_by_hand():
    # s = identity, tau = 1: each row is -log(e / (e + 1)) = log(1 + e^-1).
    img = torch.eye(2)
    txt = torch.eye(2)
    loss = contrastive_loss(img, txt, torch.tensor([0, 1]), torch.tensor([1.0]))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_contrastive_same_image_captions_are_positives():
    # 3 pairs, pairs 0 and 1 share an image. s_ij given directly (img = I, txt = s^T).
    s = torch.tensor([[0.9, 0.6, 0.1], [0.7, 0.8, 0.2], [0.0, 0.3, 0.5]])
    tau = 0.5
    ids = [0, 0, 1]

    def row_loss(logits_row, positives):
        z = sum(math.exp(v / tau) for v in logits_row)
        return -sum(math.log(math.exp(logits_row[j] / tau) / z) for j in positives) / len(positives)

    pos = [[j for j in range(3) if ids[j] == ids[i]] for i in range(3)]
    i2t = sum(row_loss(s[i].tolist(), pos[i]) for i in range(3)) / 3
    t2i = sum(row_loss(s[:, i].tolist(), pos[i]) for i in range(3)) / 3
    got = contrastive_loss(torch.eye(3), s.T, torch.tensor(ids), torch.tensor([tau]))
    assert float(got) == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_weighted_triplet_by_hand():
    s = torch.tensor([[0.9, 0.8], [0.3, 0.5]])
    # image anchors: c(0,1) = 0.2 + 0.8 - 0.9 = 0.1; c(1,0) = 0.2 + 0.3 - 0.5 = 0.
    # caption anchors: caption 0 vs image 1: 0.2 + 0.3 - 0.9 < 0; caption 1 vs image 0: 0.2 + 0.8 - 0.5 = 0.5.
    w = lambda c: (1 - math.exp(-c)) ** 2  # noqa: E731
    expected = (0.1 * w(0.1) + 0.5 * w(0.5)) / 2  # = 0.0391573
    got = weighted_triplet_loss(torch.eye(2), s.T, torch.tensor([0, 1]), margin=0.2, gamma=2.0)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(got) == pytest.approx(0.0391573, abs=1e-6)  # the number itself, not only the formula
    mean = weighted_triplet_loss(torch.eye(2), s.T, torch.tensor([0, 1]), reduction="mean")
    assert float(mean) == pytest.approx(expected / 2, abs=1e-6)  # 2 off-diagonal pairs


def test_triplet_same_image_positive_excludes_those_pairs():
    s = torch.tensor([[0.9, 0.8], [0.3, 0.5]])
    ids = torch.tensor([4, 4])  # both captions belong to one image
    negative = weighted_triplet_loss(torch.eye(2), s.T, ids, same_image="negative")
    positive = weighted_triplet_loss(torch.eye(2), s.T, ids, same_image="positive")
    assert float(negative) > 0 and float(positive) == 0.0


def test_uniformity_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # squared distances: (0,1)=2, (0,2)=4, (1,2)=2 -> values -t*d with t=2 over 6 ordered pairs.
    expected = math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6)
    assert float(uniformity_loss(e, t=2.0)) == pytest.approx(expected, abs=1e-6)


def test_harma_loss_is_the_weighted_sum_of_independently_computed_parts():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 3, 4])  # pairs 0 and 1 share an image
    temp = torch.tensor([0.07])
    # Non-default weights and triplet settings: a wrong weight or a setting not passed on shows.
    cfg = LossConfig(contrastive_weight=0.5, triplet_weight=2.0, uniformity_weight=0.25, triplet_margin=0.3,
                     triplet_gamma=1.5, triplet_same_image="positive", triplet_reduction="mean", uniformity_t=3.0)
    contrastive = float(contrastive_loss(img, txt, ids, temp))
    triplet = float(weighted_triplet_loss(img, txt, ids, margin=0.3, gamma=1.5, same_image="positive",
                                          reduction="mean"))
    # Uniformity: each image once (its first pair), every caption, averaged over the two modalities.
    uniformity = (float(uniformity_loss(img[[0, 2, 3, 4, 5]], t=3.0)) + float(uniformity_loss(txt, t=3.0))) / 2
    assert min(abs(contrastive), abs(triplet), abs(uniformity)) > 1e-3  # every part counts
    out = harma_loss(img, txt, ids, temp, cfg)
    assert float(out["contrastive"]) == pytest.approx(contrastive, rel=1e-6)
    assert float(out["triplet"]) == pytest.approx(triplet, rel=1e-6)
    assert float(out["uniformity"]) == pytest.approx(uniformity, rel=1e-6)
    assert float(out["loss"]) == pytest.approx(0.5 * contrastive + 2.0 * triplet + 0.25 * uniformity, rel=1e-6)
    # A zero weight drops its part: not computed, not added.
    without = harma_loss(img, txt, ids, temp, cfg.model_copy(update={"uniformity_weight": 0.0}))
    assert float(without["uniformity"]) == 0.0
    assert float(without["loss"]) == pytest.approx(0.5 * contrastive + 2.0 * triplet, rel=1e-6)
    with pytest.raises(ValueError, match="at least one loss weight"):
        LossConfig(contrastive_weight=0, triplet_weight=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(uniformity_weight=0.5, triplet_same_image="positive")])
def test_global_batch_on_two_processes_equals_one_process(tmp_path, cfg):
    from distributed_check import loss_and_grads, make_problem, worker

    result = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, _free_port(), str(result), cfg), nprocs=2, join=True)
    got = torch.load(result)
    x, y, ids, w_img, w_txt = make_problem()
    loss, grads = loss_and_grads(x, y, ids, w_img, w_txt, cfg)
    assert float(got["loss"]) == pytest.approx(float(loss), rel=1e-5)
    for g_dist, g_full in zip(got["grads"], grads, strict=True):
        torch.testing.assert_close(g_dist, g_full, rtol=1e-4, atol=1e-6)
