"""RQ-VAE (TIGER's semantic-ID tokenizer): MLP encoder -> residual quantizer -> MLP decoder.

Shape legend: B batch, D input (text embedding) dim, E latent dim, L levels, K codes per level.

    x_BD -> encoder -> z_BE -> level 0: nearest code c0 of r0 = z; r1 = r0 - e0; level 1: ... -> codes_BL
    zq_BE = e0 + e1 + ... (the quantized latent) -> decoder -> x_hat_BD

Loss (TIGER / VQ-VAE): ``mse(x_hat, x) + sum_l ( |sg(r_l) - e_l|^2 + beta |r_l - sg(e_l)|^2 )``.
Gradients pass the non-differentiable nearest-code step either with the straight-through estimator
(``gradient="ste"``: ``zq = z + sg(zq - z)``) or the rotation trick (``gradient="rotation"``, Fifty et
al. 2024: ``zq = sg(|zq|/|z| R) z`` with R the rotation taking z's direction to zq's, so the decoder's
gradient reaches the encoder rotated and scaled as the quantization moved the vector). Both give the
same forward value; they differ only in the gradient.

Codebooks are plain parameters trained by the codebook term. Two mechanisms keep them used:
``kmeans_init`` (each level's codebook starts as k-means centroids of that level's residuals on a
first sample, computed level after level), and dead-code restarts (``restart_dead_codes``: a code
chosen by fewer than ``dead_code_threshold`` vectors over a window is moved onto a random residual
of the current batch). Both are collective under torch.distributed: rank 0 computes, every rank
receives the same values, so the replicas stay identical (the trainer in ``train_rqvae`` wraps the
model in DDP, which averages the gradients).

Pure PyTorch: no Ray, no I/O. ``train_rqvae.py`` trains it; ``assign.py`` encodes items with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class RqVaeShape:
    """The architecture (what a checkpoint must match)."""

    input_dim: int
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 256


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values on every rank (in place); a no-op in a single process."""
    if _is_dist():
        dist.broadcast(t, src=0)
    return t


def nearest_code(x_BE: torch.Tensor, codebook_KE: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared Euclidean distance) for every row: int64 [B]."""
    # |x|^2 is the same for every code, so argmin of |e|^2 - 2 x.e is the nearest one.
    scores_BK = codebook_KE.pow(2).sum(1)[None, :] - 2.0 * x_BE @ codebook_KE.T
    return scores_BK.argmin(dim=1)


def kmeans(x_NE: torch.Tensor, k: int, num_iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++-style seeding; returns centroids [k, E].

    Clusters that lose all their points are re-seeded on the point farthest from its centroid, so
    the result always has k distinct centroids when there are at least k distinct points.
    """
    n = x_NE.shape[0]
    if n < k:
        raise ValueError(f"k-means initialisation needs at least {k} vectors (codebook size), got {n}")
    # k-means++ seeding: each next centroid is sampled proportionally to the squared distance.
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x_NE[first]]
    dist_N = (x_NE - x_NE[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(dist_N.sum())
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(dist_N / total, 1, generator=generator))
        centroids.append(x_NE[idx])
        dist_N = torch.minimum(dist_N, (x_NE - x_NE[idx]).pow(2).sum(1))
    c_KE = torch.stack(centroids).clone()
    for _ in range(num_iters):
        assign_N = nearest_code(x_NE, c_KE)
        counts_K = torch.bincount(assign_N, minlength=k).to(x_NE.dtype)
        sums_KE = torch.zeros_like(c_KE).index_add_(0, assign_N, x_NE)
        empty = counts_K == 0
        c_KE = torch.where(empty[:, None], c_KE, sums_KE / counts_K.clamp_min(1)[:, None])
        if empty.any():
            far_N = (x_NE - c_KE[assign_N]).pow(2).sum(1)
            c_KE[empty] = x_NE[far_N.topk(int(empty.sum())).indices]
    return c_KE


def rotate_to(z_BE: torch.Tensor, target_BE: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The rotation trick: a value equal to ``target`` whose gradient w.r.t. ``z`` is ``s R``.

    R (treated as a constant) is the rotation taking z's direction u to the target's direction q in
    the plane they span, ``R = I - 2 r r^T + 2 q u^T`` with ``r = (u + q) / |u + q|``; s = |target|/|z|.
    """
    z_norm = z_BE.norm(dim=1, keepdim=True).clamp_min(eps)
    t_norm = target_BE.norm(dim=1, keepdim=True)
    u = (z_BE / z_norm).detach()
    q = (target_BE / t_norm.clamp_min(eps)).detach()
    r = F.normalize(u + q, dim=1, eps=eps)
    rz = z_BE - 2.0 * r * (r * z_BE).sum(1, keepdim=True) + 2.0 * q * (u * z_BE).sum(1, keepdim=True)
    return rz * (t_norm / z_norm).detach()


class ResidualQuantizer(nn.Module):
    """L codebooks of K codes each, applied to successive residuals."""

    def __init__(self, num_levels: int, codebook_size: int, dim: int):
        super().__init__()
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.codebooks = nn.Parameter(torch.randn(num_levels, codebook_size, dim) / dim**0.5)
        # Filled by kmeans_init (or set explicitly); checkpoints carry it so a resumed run skips init.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def residuals(self, z_BE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [B, L], residuals [B, L, E] entering each level, chosen codes [B, L, E]) without gradient
        through the code choice (the chosen codes carry the codebook's gradient)."""
        codes, res, chosen = [], [], []
        r_BE = z_BE
        for level in range(self.num_levels):
            cb_KE = self.codebooks[level]
            c_B = nearest_code(r_BE.detach(), cb_KE.detach())
            e_BE = cb_KE[c_B]
            codes.append(c_B)
            res.append(r_BE)
            chosen.append(e_BE)
            # The next level quantizes what this one left; the codebook is trained by its own term only.
            r_BE = r_BE - e_BE.detach()
        return torch.stack(codes, 1), torch.stack(res, 1), torch.stack(chosen, 1)

    @torch.no_grad()
    def kmeans_init(self, z_NE: torch.Tensor, num_iters: int, seed: int) -> None:
        """Each level's codebook := k-means of that level's residuals on ``z`` (rank 0's, broadcast)."""
        generator = torch.Generator().manual_seed(seed)
        r_NE = z_NE.detach().float()
        for level in range(self.num_levels):
            centroids_KE = kmeans(r_NE, self.codebook_size, num_iters, generator)
            self.codebooks.data[level] = _broadcast(centroids_KE.to(self.codebooks.device))
            # Residuals after this level use the broadcast codebook, so all ranks agree on the next level.
            r_NE = r_NE - self.codebooks.data[level][nearest_code(r_NE, self.codebooks.data[level])]
        self.initialized.fill_(True)

    @torch.no_grad()
    def restart_codes(
        self, level: int, dead_K: torch.Tensor, r_NE: torch.Tensor, generator: torch.Generator
    ) -> int:
        """Move the dead codes of ``level`` onto random rows of ``r_NE`` (rank 0's rows, broadcast).

        ``dead_K`` must be the same on every rank (computed from all-reduced counts). Returns how many
        codes were restarted.
        """
        dead = torch.nonzero(dead_K).flatten()
        if dead.numel() == 0:
            return 0
        picks = torch.randint(r_NE.shape[0], (dead.numel(),), generator=generator)
        new_DE = r_NE[picks].detach().float().to(self.codebooks.device).contiguous()
        self.codebooks.data[level, dead] = _broadcast(new_DE)
        return int(dead.numel())


class RqVae(nn.Module):
    """Encoder, residual quantizer and decoder; ``forward`` returns the loss terms and the codes."""

    def __init__(self, shape: RqVaeShape, beta: float = 0.25, gradient: str = "ste"):
        super().__init__()
        if gradient not in ("ste", "rotation"):
            raise ValueError(f"gradient must be 'ste' or 'rotation', got {gradient!r}")
        self.shape = shape
        self.beta = beta
        self.gradient = gradient
        dims = [shape.input_dim, *shape.hidden_dims, shape.latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(list(reversed(dims)))
        self.quantizer = ResidualQuantizer(shape.num_levels, shape.codebook_size, shape.latent_dim)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The latent z [B, E]."""
        return self.encoder(x_BD)

    @torch.no_grad()
    def codes(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Semantic codes [B, L] (int64) of the inputs."""
        codes_BL, _, _ = self.quantizer.residuals(self.encoder(x_BD))
        return codes_BL

    def forward(self, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms (``loss``, ``recon``, ``codebook``, ``commit``), ``codes`` [B, L] and ``residuals``
        [B, L, E] (detached; used for dead-code restarts)."""
        z_BE = self.encoder(x_BD)
        codes_BL, res_BLE, chosen_BLE = self.quantizer.residuals(z_BE)
        zq_BE = chosen_BLE.detach().sum(1)
        if self.gradient == "ste":
            zq_BE = z_BE + (zq_BE - z_BE).detach()
        else:
            zq_BE = rotate_to(z_BE, zq_BE)
        x_hat_BD = self.decoder(zq_BE)
        recon = F.mse_loss(x_hat_BD, x_BD)
        # Mean over batch and latent dims, summed over levels (TIGER sums the per-level VQ losses).
        codebook = (res_BLE.detach() - chosen_BLE).pow(2).mean((0, 2)).sum()
        commit = (res_BLE - chosen_BLE.detach()).pow(2).mean((0, 2)).sum()
        loss = recon + codebook + self.beta * commit
        return {
            "loss": loss,
            "recon": recon.detach(),
            "codebook": codebook.detach(),
            "commit": commit.detach(),
            "codes": codes_BL,
            "residuals": res_BLE.detach(),
        }


def usage_and_perplexity(codes_NL: torch.Tensor, codebook_size: int) -> tuple[list[float], list[float]]:
    """Per level: the share of codes used at least once, and the perplexity exp(entropy) of the code
    distribution (K when uniform, 1 when every vector picks the same code)."""
    usage, perplexity = [], []
    for level in range(codes_NL.shape[1]):
        counts_K = torch.bincount(codes_NL[:, level].long(), minlength=codebook_size).double()
        usage.append(float((counts_K > 0).double().mean()))
        p_K = counts_K / counts_K.sum().clamp_min(1)
        entropy = -(p_K[p_K > 0] * p_K[p_K > 0].log()).sum()
        perplexity.append(float(entropy.exp()))
    return usage, perplexity
