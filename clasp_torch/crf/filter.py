"""The pairwise term of the dense CRF: both Gaussian kernels as one fused lattice operator.

:class:`FusedLatticeOperator` applies ``V -> sum_l diag(b_l) K_l diag(a_l) V`` for the
smoothness and appearance lattices with one splat, ``d+1`` blur steps and one slice, each a
single ``embedding_bag``; :class:`FusedFilter` gives it the exact adjoint as its gradient;
:func:`pairwise_operator` builds the lattices of a batch (the set-up of
:func:`~clasp_torch.crf.dense_crf`) with densecrf's NORMALIZE_SYMMETRIC scales folded in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .lattice import PermutohedralLattice, build_per_image, lattice_filter_ones

__all__ = ["FusedLatticeOperator", "FusedFilter", "pairwise_operator"]


class FusedLatticeOperator:
    """Linear operator ``V (P, C) -> sum_l diag(b_l) K_l diag(a_l) V`` over several lattices.

    ``K_l`` is lattice ``l``'s splat / blur / slice filter (including densecrf's ``alpha``).
    The per-point scales ``a_l`` (applied before splatting) and ``b_l`` (after slicing) are
    folded into the splat and slice weights, and all lattices share one splat, one slice and
    ``max(d_l)+1`` blur steps, each a single ``embedding_bag`` (gather + weighted sum) call.
    ``apply(V, transpose=True)`` is the exact adjoint (blur steps in reverse order); the tensors
    it needs are only kept when ``adjoint=True``.
    """

    def __init__(
        self,
        lattices: list[PermutohedralLattice],
        splat_scales: list[Tensor],
        slice_scales: list[Tensor],
        dtype: torch.dtype,
        adjoint: bool = True,
    ) -> None:
        device = lattices[0].offsets.device
        self.P = int(lattices[0].offsets.shape[0])
        self.M = sum(lat.n_vertices for lat in lattices)
        E = sum(lat.d + 1 for lat in lattices)
        n_entries = self.P * E
        itype = torch.int32 if max(n_entries, self.M) < 2**31 - 1 else torch.int64
        idx, ws, wl, bases = [], [], [], []
        base = 0
        for lat, a, b in zip(lattices, splat_scales, slice_scales):
            w = lat.weights.to(dtype)
            idx.append(lat.offsets.to(itype) + base)
            ws.append(w * a.to(dtype).view(-1, 1))
            wl.append(w * (b.to(dtype) * lat.alpha).view(-1, 1))
            bases.append(base)
            base += lat.n_vertices
        self.idx_flat = torch.cat(idx, 1).reshape(-1)  # (P*E,) entry e = p*E + col
        del idx
        self.w_slice = torch.cat(wl, 1).reshape(-1)
        del wl
        self.slice_offsets = torch.arange(
            0, n_entries + 1, E, device=device, dtype=itype
        )
        # splat in vertex-grouped order (from each lattice's key sort); fused entry index p*E + col
        pix_l, sw_l, bounds, perms = [], [], [], []
        col, ent = 0, 0
        for lat, wsp in zip(lattices, ws):
            dp1 = lat.d + 1
            pl = lat.splat_perm.to(torch.int64)
            pix_l.append(torch.div(pl, dp1, rounding_mode="floor").to(itype))
            sw_l.append(wsp.reshape(-1).index_select(0, pl))
            bounds.append(lat.splat_bounds[:-1].to(itype) + ent)
            if adjoint:
                perms.append(
                    torch.div(pl, dp1, rounding_mode="floor") * E + (pl % dp1 + col)
                )
            del pl
            col += dp1
            ent += lat.splat_perm.numel()
        self.sorted_pix = torch.cat(pix_l)
        del pix_l
        self.bag_offsets = torch.cat(
            bounds + [torch.tensor([ent], dtype=itype, device=device)]
        )
        self._sorted_w: dict[bool, Tensor] = {False: torch.cat(sw_l)}
        del sw_l
        self.adjoint = adjoint
        if adjoint:
            self.perm = torch.cat(perms)
            self.w_splat = torch.cat(ws, 1).reshape(-1)
        del perms, ws
        self._nb = [
            (lat.blur_n1, lat.blur_n2, lat.d, lat.n_vertices) for lat in lattices
        ]
        self.bases = bases
        self._blur: dict[bool, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self.n_steps = max(lat.d + 1 for lat in lattices)
        self.device = device
        self.dtype = dtype
        self.itype = itype
        self._blur_tables(False)

    def _splat_weights(self, transpose: bool) -> Tensor:
        if transpose not in self._sorted_w:
            if not self.adjoint:
                raise RuntimeError("operator built without adjoint support")
            self._sorted_w[transpose] = self.w_slice.index_select(0, self.perm)
        return self._sorted_w[transpose]

    def _blur_tables(self, reverse: bool) -> list[tuple[Tensor, Tensor, Tensor]]:
        if reverse in self._blur:
            return self._blur[reverse]
        tables = []
        half = torch.tensor([1.0, 0.5, 0.5], dtype=self.dtype, device=self.device)
        for s in range(self.n_steps):
            idx3, val3 = [], []
            for (bn1, bn2, d, M), base in zip(self._nb, self.bases):
                ar = torch.arange(M, device=self.device)
                if s <= d:
                    j = d - s if reverse else s
                    n1, n2 = bn1[j], bn2[j]
                    i3 = torch.stack([ar, n1, n2], 1)
                    v3 = torch.stack(
                        [torch.ones_like(ar, dtype=torch.bool), n1 < M, n2 < M], 1
                    )
                else:
                    i3 = torch.stack([ar, ar, ar], 1)
                    v3 = torch.zeros(M, 3, dtype=torch.bool, device=self.device)
                    v3[:, 0] = True
                idx3.append(i3 + base)
                val3.append(v3)
            i3 = torch.cat(idx3)
            v3 = torch.cat(val3)
            flat_idx = i3[v3].to(self.itype)
            flat_w = half.expand_as(i3)[v3].contiguous()
            cnt = v3.sum(1)
            offs = torch.cat([cnt.new_zeros(1), cnt.cumsum(0)]).to(self.itype)
            tables.append((flat_idx, flat_w, offs))
        self._blur[reverse] = tables
        return tables

    def apply(self, V: Tensor, transpose: bool = False) -> Tensor:
        """Apply the operator (or its adjoint) to ``V (P, C)``; returns ``(P, C)``."""
        V = V.contiguous()
        grid = F.embedding_bag(
            self.sorted_pix,
            V,
            self.bag_offsets,
            mode="sum",
            per_sample_weights=self._splat_weights(transpose),
            include_last_offset=True,
        )
        for flat_idx, flat_w, offs in self._blur_tables(transpose):
            grid = F.embedding_bag(
                flat_idx,
                grid,
                offs,
                mode="sum",
                per_sample_weights=flat_w,
                include_last_offset=True,
            )
        w = self.w_splat if transpose else self.w_slice
        return F.embedding_bag(
            self.idx_flat,
            grid,
            self.slice_offsets,
            mode="sum",
            per_sample_weights=w,
            include_last_offset=True,
        )

    def __call__(self, V: Tensor) -> Tensor:
        if torch.is_grad_enabled() and V.requires_grad:
            return FusedFilter.apply(V, self, False)
        return self.apply(V)


class FusedFilter(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, V: Tensor, op: FusedLatticeOperator, transpose: bool
    ) -> Tensor:  # type: ignore[override]
        ctx.op = op
        ctx.transpose = transpose
        return op.apply(V, transpose)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        op: FusedLatticeOperator = ctx.op
        if (
            torch.is_grad_enabled() and grad.requires_grad
        ):  # double backward stays differentiable
            return FusedFilter.apply(grad, op, not ctx.transpose), None, None
        return op.apply(grad, not ctx.transpose), None, None


@torch.no_grad()
def pairwise_operator(
    image: Tensor,
    pix: Tensor | None,
    counts: list[int],
    dtype: torch.dtype,
    *,
    sxy_gaussian: float | None,
    compat_gaussian: float,
    bilateral: tuple[float, float, float] | None,
    chunk_points: int,
    adjoint: bool,
) -> FusedLatticeOperator | None:
    """The lattice operator of the CRF's message for a batch (``None`` without a lattice kernel).

    Args:
        image: ``(B, 3, H, W)`` RGB in ``[0, 255]``.
        pix: ``(P,)`` flat indices of the valid pixels (``None``: all ``B*H*W``), grouped by image.
        counts: valid pixels per image.
        sxy_gaussian: bandwidth of the smoothness kernel on the lattice (``None``: not on it).
        compat_gaussian: its Potts weight.
        bilateral: ``(sxy, srgb, compat)`` of the appearance kernel (``None``: off).
        chunk_points: images per lattice build while their points sum to at most this
            (:func:`~clasp_torch.crf.lattice.build_per_image`).
        adjoint: keep what the adjoint (the gradient) needs.
    """
    B, _, H, W = image.shape
    N = H * W
    device = image.device
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float32, device=device),
        torch.arange(W, dtype=torch.float32, device=device),
        indexing="ij",
    )
    xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)  # (N, 2): (x, y) as densecrf
    lattices: list[PermutohedralLattice] = []
    compats: list[float] = []
    if sxy_gaussian is not None:
        fg = (xy / torch.tensor(float(sxy_gaussian), dtype=torch.float32, device="cpu")).repeat(B, 1)
        if pix is not None:
            fg = fg.index_select(0, pix)
        lattices.append(build_per_image(fg, counts, chunk_points))
        del fg
        compats.append(float(compat_gaussian))
    if bilateral is not None:
        sxy_b, srgb_b, compat_b = bilateral
        rgb = image.permute(0, 2, 3, 1).reshape(B * N, 3).to(torch.float32)
        sxy_t = torch.tensor(float(sxy_b), dtype=torch.float32, device="cpu")
        srgb_t = torch.tensor(float(srgb_b), dtype=torch.float32, device="cpu")
        fb = torch.cat([(xy / sxy_t).repeat(B, 1), rgb / srgb_t], 1)
        del rgb
        if pix is not None:
            fb = fb.index_select(0, pix)
        lattices.append(build_per_image(fb, counts, chunk_points))
        del fb
        compats.append(float(compat_b))
    if not lattices:
        return None
    # NORMALIZE_SYMMETRIC: norm = 1/sqrt(K 1 + 1e-20), message = c * norm * K (norm * Q)
    scales = [torch.rsqrt(lattice_filter_ones(lat) + 1e-20) for lat in lattices]
    return FusedLatticeOperator(lattices, scales, [s * c for s, c in zip(scales, compats)], dtype, adjoint=adjoint)
