"""Orthogonal matrices for rotating a model's residual stream (QuaRot / SpinQuant's R1).

Pure math, no model: :func:`hadamard` builds a +-1 Hadamard matrix of an order where a
construction is known (Sylvester's doubling, Paley's constructions I and II, and Kronecker products
of them: 576 = 12 * 12 * 4, 896 = 28 * 32, 3072 = 12 * 256, ...); :func:`rotation_matrix` turns
one into a randomized orthogonal matrix (random signs on its rows), or draws a random orthogonal
matrix (QR of a seeded Gaussian). Everything is float64: the caller folds the matrix into weights
in float64 and casts back once.

The model-level walk (which weights get multiplied by what) is ``eqat_cli.rotate``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from eqat_cli.errors import UnsupportedError

KINDS = ("auto", "hadamard", "orthogonal")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) for the quadratic character chi of GF(q), q an odd prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n from Paley's construction I (n = q + 1, q = 3 mod 4) or II
    (n = 2 (q + 1), q = 1 mod 4), q prime; None when neither applies."""
    q = n - 1
    if q % 4 == 3 and _is_prime(q):
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, one) + torch.kron((c == 0).double(), zero)
    return None


@lru_cache(maxsize=None)
def _hadamard(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    direct = _paley(n)
    if direct is not None:
        return direct
    # n = a * b with Hadamard matrices of both orders (2 first: Sylvester's doubling)
    for a in [2, *range(4, n // 2 + 1, 4)]:
        if n % a == 0 and n // a > 1:
            left = _hadamard(a)
            if left is None:
                continue
            right = _hadamard(n // a)
            if right is not None:
                return torch.kron(left, right)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A +-1 matrix H of order n with H H^T = n I (float64), or None when no construction here
    reaches n. Checked before it is returned (exactly up to order 2048, on random vectors above)."""
    h = _hadamard(int(n))
    if h is None:
        return None
    if n <= 2048:
        ok = torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    else:
        v = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ok = torch.allclose(h @ (h.T @ v), n * v, rtol=1e-9, atol=1e-6)
    if not ok:  # pragma: no cover
        raise AssertionError(f"Hadamard construction of order {n} is wrong")
    return h.clone()


def rotation_matrix(n: int, kind: str = "auto", seed: int = 0) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix Q (float64) and the kind it is.

    * ``hadamard``: diag(s) H / sqrt(n) for a Hadamard H of order n and random signs s (seeded);
      refused (one line) when :func:`hadamard` has no construction for n;
    * ``orthogonal``: Q of the QR decomposition of a seeded standard Gaussian matrix, with the
      signs that make it Haar-distributed;
    * ``auto``: ``hadamard`` when n has one, else ``orthogonal``.
    """
    if kind not in KINDS:
        raise UnsupportedError(f"unknown rotation {kind!r}; choose from {', '.join(KINDS)}")
    gen = torch.Generator().manual_seed(int(seed))
    h = hadamard(n) if kind in ("auto", "hadamard") else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).double() * 2 - 1
        return signs.view(-1, 1) * h / n**0.5, "hadamard"
    if kind == "hadamard":
        raise UnsupportedError(f"no Hadamard matrix construction of order {n} here; use the orthogonal rotation")
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).view(1, -1), "orthogonal"
