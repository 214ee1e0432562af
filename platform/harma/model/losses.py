"""HarMA objectives on L2-normalised embeddings; pure tensor -> tensor functions.

* `contrastive_loss`: InfoNCE where every caption of the same image is a positive (targets
  spread uniformly over the positives), symmetric, with a learnable temperature.
* `weighted_triplet_loss`: the focal-weighted two-way hinge ("adaptive triplet") of the paper
  code: cost c = max(0, margin + s_neg - s_pos) weighted by (1 - exp(-c))^gamma, summed over all
  pairs in both directions and halved (or averaged). Other captions of the same image are
  negatives as in the paper code, or excluded (`same_image="positive"`).
* `uniformity_loss`: the single-modality uniformity objective, log E exp(-t ||x - y||^2) over
  distinct pairs within each modality (Wang & Isola), averaged over the two modalities.
* `harma_loss`: the weighted sum, computed over the *global* batch: on several workers the
  embeddings are all-gathered with gradients (`gather_with_grad`), so every rank computes the same
  full-batch loss and data-parallel gradient averaging yields exactly its gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harma.config import LossConfig


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """Multi-positive symmetric InfoNCE.

    Args:
        image_emb: (B, D) normalised image embeddings of the B pairs.
        text_emb: (B, D) normalised caption embeddings.
        image_ids: (B,) image identity of each pair; equal ids are positives of each other.
        temperature: (1,) or scalar tau; logits are s / tau.
    Returns:
        scalar: (L_i2t + L_t2i) / 2.
    """
    logits = image_emb @ text_emb.T / temperature  # (B, B)
    positives = (image_ids[:, None] == image_ids[None, :]).to(logits.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def weighted_triplet_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_ids: torch.Tensor,
    margin: float = 0.2,
    gamma: float = 2.0,
    same_image: str = "negative",
    reduction: str = "sum",
) -> torch.Tensor:
    """Focal-weighted bidirectional triplet loss on cosine similarities.

    For pair i (image v_i, caption t_i) and every other pair j: image anchor cost
    c_s = max(0, m + s(v_i, t_j) - s(v_i, t_i)), caption anchor cost
    c_im = max(0, m + s(v_j, t_i) - s(v_i, t_i)); each weighted by (1 - exp(-c))^gamma (not
    detached, as in the paper code). `reduction="sum"`: (sum c_s w + sum c_im w) / 2;
    `"mean"`: the same divided by the number of counted pairs.
    """
    sim = image_emb @ text_emb.T  # (B, B), rows images, columns captions
    diag = sim.diagonal()
    cost_caption = (margin + sim - diag[:, None]).clamp(min=0)  # image anchor i, caption j
    cost_image = (margin + sim - diag[None, :]).clamp(min=0)  # caption anchor j, image i
    excluded = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if same_image == "positive":
        excluded = excluded | (image_ids[:, None] == image_ids[None, :])
    elif same_image != "negative":
        raise ValueError(f"same_image must be 'negative' or 'positive', got {same_image!r}")
    cost_caption = cost_caption.masked_fill(excluded, 0)
    cost_image = cost_image.masked_fill(excluded, 0)
    total = (_focal(cost_caption, gamma) * cost_caption).sum()
    total = total + (_focal(cost_image, gamma) * cost_image).sum()
    if reduction == "sum":
        return total / 2
    if reduction == "mean":
        pairs = (~excluded).sum().clamp(min=1)
        return total / (2 * pairs)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _focal(cost: torch.Tensor, gamma: float) -> torch.Tensor:
    return (1 - torch.exp(-cost)) ** gamma


def uniformity_loss(emb: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{i != j} exp(-t ||e_i - e_j||^2) for (N, D) normalised embeddings."""
    n = emb.shape[0]
    if n < 2:
        return emb.sum() * 0
    sq_dist = (2 - 2 * emb @ emb.T).clamp(min=0)  # (N, N); unit vectors
    off_diag = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    values = -t * sq_dist[off_diag]
    return torch.logsumexp(values, dim=0) - torch.log(torch.tensor(float(values.numel())))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather along dim 0 when ranks hold different row counts (padding to the largest)."""
    world = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]), sizes


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        full, sizes = _gather_rows(tensor)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every row: sum their gradients, keep this rank's rows.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping gradients to the local rows.

    The backward sums the gradient of every rank's copy of the loss into each rank's rows; with
    each rank computing the same global loss and the optimizer averaging gradients over ranks, the
    update equals the full-batch gradient. Ranks may hold different row counts. Without an
    initialised process group (one worker) this is the identity.
    """
    return _GatherWithGrad.apply(tensor) if _distributed() else tensor


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """All-gather an integer tensor (no gradient), rows in rank order."""
    return _gather_rows(ids)[0] if _distributed() else ids


def harma_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_ids: torch.Tensor,
    temperature: torch.Tensor,
    cfg: LossConfig,
) -> dict[str, torch.Tensor]:
    """The configured objective over the global batch.

    Args:
        image_emb, text_emb: (b, D) local normalised embeddings.
        image_ids: (b,) local image ids (must be unique per image across ranks).
        temperature: (1,) learnable temperature.
    Returns:
        {"loss", "contrastive", "triplet", "uniformity"}: scalars; the parts are unweighted.
    """
    image_all = gather_with_grad(image_emb)
    text_all = gather_with_grad(text_emb)
    ids_all = gather_ids(image_ids)
    zero = image_all.sum() * 0
    parts = {"contrastive": zero, "triplet": zero, "uniformity": zero}
    if cfg.contrastive_weight > 0:
        parts["contrastive"] = contrastive_loss(image_all, text_all, ids_all, temperature)
    if cfg.triplet_weight > 0:
        parts["triplet"] = weighted_triplet_loss(
            image_all,
            text_all,
            ids_all,
            margin=cfg.triplet_margin,
            gamma=cfg.triplet_gamma,
            same_image=cfg.triplet_same_image,
            reduction=cfg.triplet_reduction,
        )
    if cfg.uniformity_weight > 0:
        parts["uniformity"] = (
            uniformity_loss(_unique_rows(image_all, ids_all), cfg.uniformity_t)
            + uniformity_loss(text_all, cfg.uniformity_t)
        ) / 2
    loss = (
        cfg.contrastive_weight * parts["contrastive"]
        + cfg.triplet_weight * parts["triplet"]
        + cfg.uniformity_weight * parts["uniformity"]
    )
    return {"loss": loss, **parts}


def _unique_rows(emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """First row of each distinct id (the same image appears once per caption in a batch)."""
    _, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), ids.numel(), device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.numel(), device=ids.device), "amin")
    return emb[first]
