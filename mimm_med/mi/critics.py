"""Critics that score every pair (a_i, b_j) of a batch without pushing B² rows through a deep MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mimm_med.checks import is_whole_number

__all__ = ["mlp", "SeparableCritic", "ConcatCritic", "make_critic"]


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """A ReLU multilayer perceptron with ``num_layers`` hidden layers of width ``hidden_dim``.

    Examples
    --------
    >>> mlp(8, 64, 2, num_layers=2)(torch.zeros(5, 8)).shape
    torch.Size([5, 2])
    """
    if not is_whole_number(num_layers, minimum=0):
        raise ValueError(f"num_layers must be a whole number >= 0, got {num_layers!r}")
    # A zero width would silently make every score the same constant (an estimate of 0).
    widths_used = (in_dim, out_dim, hidden_dim) if num_layers > 0 else (in_dim, out_dim)
    if not all(is_whole_number(width, minimum=1) for width in widths_used):
        raise ValueError(
            f"layer widths must be whole numbers >= 1, got in_dim={in_dim!r}, hidden_dim={hidden_dim!r}, "
            f"out_dim={out_dim!r}"
        )
    widths = [int(in_dim)] + [int(hidden_dim)] * int(num_layers)
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], int(out_dim)))
    return nn.Sequential(*layers)


class SeparableCritic(nn.Module):
    """T(a, b) = g(a)ᵀ h(b): two MLP embeddings and one B×B matrix product.

    Scoring all B² pairs costs 2B MLP rows plus a (B, k)·(k, B) product, so it stays cheap at any
    batch size. With a constant and a linear coordinate in each embedding it represents the
    optimal critic of Gaussian data exactly (a bilinear term plus terms in a and b alone).

    Parameters
    ----------
    dim_a, dim_b
        Feature sizes of ``a`` and ``b``.
    hidden_dim
        Width of the hidden layers of both embeddings.
    embed_dim
        Size of the embeddings whose inner product is the score.
    num_layers
        Hidden layers per embedding.

    Examples
    --------
    >>> SeparableCritic(8, 4)(torch.randn(16, 8), torch.randn(16, 4)).shape
    torch.Size([16, 16])
    """

    def __init__(
        self, dim_a: int, dim_b: int, hidden_dim: int = 256, embed_dim: int = 32, num_layers: int = 2
    ) -> None:
        super().__init__()
        self.embed_a = mlp(dim_a, hidden_dim, embed_dim, num_layers)
        self.embed_b = mlp(dim_b, hidden_dim, embed_dim, num_layers)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Scores ``(B_a, B_b)`` with entry (i, j) = T(a_i, b_j)."""
        return self.embed_a(a) @ self.embed_b(b).T


class ConcatCritic(nn.Module):
    """T(a, b) = MLP([a; b]) on every pair, with the first layer decomposed as W_a·a + W_b·b.

    The joint critic of MINE/MIMM, which can represent any interaction of a and b. The first
    layer runs once per sample and is broadcast-added into a (B, B, hidden) tensor, so only the
    remaining layers see B² rows; this is narrower than the reference's 400-wide stack but its
    cost and memory still grow with B² — prefer :class:`SeparableCritic` for large batches.

    Parameters
    ----------
    dim_a, dim_b
        Feature sizes of ``a`` and ``b``.
    hidden_dim
        Width of the hidden layers.
    num_layers
        Hidden layers, the decomposed first one included (>= 1).

    Examples
    --------
    >>> ConcatCritic(8, 4)(torch.randn(16, 8), torch.randn(16, 4)).shape
    torch.Size([16, 16])
    """

    def __init__(self, dim_a: int, dim_b: int, hidden_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        if not is_whole_number(num_layers, minimum=1):
            raise ValueError(f"ConcatCritic needs num_layers, a whole number >= 1 (the decomposed first layer), got {num_layers!r}")
        self.project_a = nn.Linear(dim_a, hidden_dim)
        self.project_b = nn.Linear(dim_b, hidden_dim, bias=False)
        self.head = nn.Sequential(nn.ReLU(), mlp(hidden_dim, hidden_dim, 1, num_layers - 1))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Scores ``(B_a, B_b)`` with entry (i, j) = T(a_i, b_j)."""
        first = self.project_a(a)[:, None, :] + self.project_b(b)[None, :, :]
        return self.head(first).squeeze(-1)


def make_critic(kind: str, dim_a: int, dim_b: int, *, hidden_dim: int, embed_dim: int, num_layers: int) -> nn.Module:
    """Build a critic by name: ``"separable"`` (:class:`SeparableCritic`) or ``"concat"`` (:class:`ConcatCritic`).

    Examples
    --------
    >>> type(make_critic("concat", 8, 4, hidden_dim=64, embed_dim=16, num_layers=2)).__name__
    'ConcatCritic'
    """
    if kind == "separable":
        return SeparableCritic(dim_a, dim_b, hidden_dim=hidden_dim, embed_dim=embed_dim, num_layers=num_layers)
    if kind == "concat":
        return ConcatCritic(dim_a, dim_b, hidden_dim=hidden_dim, num_layers=num_layers)
    raise ValueError(f"unknown critic {kind!r}; choose 'separable' or 'concat'")
