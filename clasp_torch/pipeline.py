"""The CLASP pipeline as one composable ``nn.Module``.

Stages (each its own module): backbone features → cosine affinity and its eigendecomposition
(:mod:`clasp_torch.spectral`) → eigengap elbow and K band → batched k-means + silhouette over the
band (:mod:`clasp_torch.cluster`) → patch labels upsampled to pixels → optional refiner (the
dense CRF of :mod:`clasp_torch.crf`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import Backbone, get_backbone
from .checks import check_shape
from .cluster import ClusterSelection, KBandClustering
from .crf_resolution import DEFAULT_CRF_BATCH_PIXELS, DEFAULT_CRF_MAX_PIXELS, CRFRefiner
from .embedding import KSelector, SpectralEmbedding
from .preprocess import DEFAULT_MAX_PATCHES, preprocess_image
from .presets import build_smoothing, resolve_preset
from .ragged import ImagesLike, images_to_list, pad_images, patch_guides, to_uint8, upsample_labels
from .settings import CLASPSettings
from .spectral import AffinityKind, EigenMethod

__all__ = ["CLASP", "CLASPOutput", "upsample_labels", "images_to_list", "pad_images", "patch_guides", "to_uint8"]



@dataclass
class CLASPOutput:
    """Result of :class:`CLASP` on a batch of ``B`` images.

    Ragged batches are padded: ``H_max, W_max`` are the largest input sizes, ``h_max, w_max``
    the largest patch grids, ``N = h_max * w_max``. Padding holds ``-1`` in label maps.

    Attributes:
        labels: ``(B, H_max, W_max)`` int64 pixel labels at input resolution (after the
            refiner if any), ``-1`` outside each image.
        patch_labels: ``(B, h_max, w_max)`` int64 labels of the patches, ``-1`` on padding.
        k_opt: ``(B,)`` eigengap elbow estimate ``K_opt``.
        k: ``(B,)`` chosen number of segments.
        eigenvalues: ``(B, N)`` affinity eigenvalues, descending (zero beyond ``n_b``).
        k_values: ``(Kc,)`` the K grid of ``silhouette``'s columns.
        silhouette: ``(B, Kc)`` mean silhouette of each K in the image's band (NaN outside).
        image_mask: ``(B, H_max, W_max)`` True on real pixels.
        patch_mask: ``(B, h_max, w_max)`` True on real patches.
        image_sizes: ``(B, 2)`` input ``(H, W)`` per image.
        grid_sizes: ``(B, 2)`` patch grid ``(h, w)`` per image.
        features: ``(B, h_max, w_max, D)`` backbone features (zeros on padding).
        coarse_labels: ``(B, H_max, W_max)`` pixel labels before the refiner (nearest upsampling
            of the patch labels).
        band_patch_labels: ``(B, Kc, h_max, w_max)`` int64 patch labels of every K of each
            image's band (columns as ``k_values``; ``-1`` on padding and outside the band), only
            with ``CLASP(keep_band_labels=True)``, else ``None`` (the K-band hierarchy of
            region proposals).
    """

    labels: Tensor
    patch_labels: Tensor
    k_opt: Tensor
    k: Tensor
    eigenvalues: Tensor
    k_values: Tensor
    silhouette: Tensor
    image_mask: Tensor
    patch_mask: Tensor
    image_sizes: Tensor
    grid_sizes: Tensor
    features: Tensor
    coarse_labels: Tensor
    band_patch_labels: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def label_map(self, i: int) -> Tensor:
        """Pixel labels of image ``i`` cropped to its own size: ``(H_i, W_i)``."""
        H, W = (int(v) for v in self.image_sizes[i])
        return self.labels[i, :H, :W]

    def patch_label_map(self, i: int) -> Tensor:
        """Patch labels of image ``i`` cropped to its own grid: ``(h_i, w_i)``."""
        h, w = (int(v) for v in self.grid_sizes[i])
        return self.patch_labels[i, :h, :w]

    def to(self, device: torch.device | str) -> CLASPOutput:
        """Move every tensor to ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k_, v in kw.items():
            if isinstance(v, Tensor):
                kw[k_] = v.to(device)
        return CLASPOutput(**kw)


def _setting(name: str, settable: bool = False) -> Any:
    """An attribute of :class:`CLASP` forwarding to ``self.settings.<name>``; ``settable`` for the
    settings read at every forward (not baked into a stage), which assignment replaces (validated)."""

    def get(self: Any) -> Any:
        return getattr(self.settings, name)

    def put(self: Any, value: Any) -> None:
        self.settings = dataclasses.replace(self.settings, **{name: value})

    return property(get, put if settable else None, doc=f"``settings.{name}``.")


class CLASP(nn.Module):
    """CLASP: training-free per-image segmentation by adaptive spectral clustering.

    Args:
        backbone: a name (``"dinov2_vits14_reg"``, the default and the paper's; or
            ``"efficientnet_lite0"``, the offline stand-in), a :class:`~clasp_torch.backbones.Backbone`
            or any ``nn.Module`` returning ``(B, h, w, D)`` (then ``patch_size``/``mean``/``std``
            must be attributes of it).
        weights: local weights file for a named backbone (also ``CLASP_WEIGHTS``).
        pretrained: ``False`` builds a randomly initialised backbone (timing, tests).
        beta: half-width of the K band around ``K_opt`` (0.5).
        fixed_k: use this K for every image instead of the adaptive choice.
        preset: named settings of the clustering and smoothing stages (:mod:`clasp_torch.presets`):
            ``"paper"`` (the default: the paper's pipeline, unchanged), ``"best"`` (guided-filter
            feature smoothing, sigma 1 patch, eps 1e-3: the best mean patch mIoU on the two dev
            sets with the stand-in backbone) or ``"fast"`` (Gaussian smoothing, sigma 1.25, with
            one k-means restart of at most 5 iterations: within 0.3 mIoU of ``paper`` on both dev
            sets, 3-4x less spectral+clustering time; ``benchmarks/RESULTS.md`` section 10). An
            explicit keyword argument below (``n_init``, ``max_iter``, ``tol``, ``smoothing``,
            ``smoothing_sigma``, ...) wins over the preset's value; ``None`` keeps it.
        n_init, max_iter, tol, seed: k-means settings (restarts run as a batch dimension);
            ``None``: the preset's (``paper``: 10, 300, 1e-4).
        max_patches: cap on patches per image (aspect kept; default 2500).
        eigen_method, affinity: spectral options (``"auto"``/``"gram"``/``"full"``; the CLASP
            affinity is ``"cosine"``; others are ablations).
        refiner: the pixel-level refinement stage: ``"crf"`` (default; the dense CRF),
            ``None``/``"none"`` (patch variant: nearest upsampling only) or an ``nn.Module``
            called as ``refiner(images (B,3,H,W) uint8, labels (B,H,W), n_labels (B,), mask (B,H,W))``.
        crf_params: keyword arguments of :class:`clasp_torch.crf.DenseCRF`, and of
            :func:`clasp_torch.crf_resolution.crf_refine_labels_bounded` (``upsample``,
            ``scale_bandwidths``).
        crf_max_pixels: working-resolution cap of the CRF (default ``2**19``, ~0.5 MP): a larger
            image is refined downscaled to at most this many pixels (aspect kept, antialiased),
            with the CRF's spatial bandwidths scaled alike, and its bilinearly upsampled marginals
            give the labels at the input size, so the CRF's cost per image is bounded
            (:mod:`clasp_torch.crf_resolution`; ~98 % of pixels as the full-resolution CRF).
            Images up to this size (every dev-set image) are refined at full resolution, as before.
        crf_batch_pixels: budget of one CRF call (default ``2**24``): a batch's images are
            refined in consecutive chunks whose padded pixels at working resolution, weighted by
            ``1 + C/50`` for ``C`` labels, stay within it (an image over it alone); this bounds
            the CRF's memory on a GPU. Chunking never changes a result.
        k_selector: ``"eigengap"`` (the paper's elbow) or ``"entropy"`` (effective rank).
        amp_dtype: run the backbone under autocast with this dtype (e.g. ``torch.bfloat16``);
            the spectral and clustering stages always run in float32/float64.
        max_problems: bound on (image, K) problems clustered at once (memory).
        smoothing: the feature-smoothing stage between the backbone and the affinity: a kind
            of :class:`~clasp_torch.smoothing.FeatureSmoothing` (``"none"``, ``"gaussian"``,
            ``"bilateral"``, ``"guided"``; with ``smoothing_sigma`` in patches and the edge-aware
            kinds' ``smoothing_sigma_color`` / ``smoothing_eps``), ``None`` for the preset's
            (``paper``: none), or any ``nn.Module`` called as ``smoothing(features (B, h, w, D), patch_mask (B, h, w),
            guide)`` returning ``(B, h, w, D)``; ``guide`` is ``None`` unless the module has
            ``needs_guide = True``, then the images area-resized to their patch grids,
            ``(B, 3, h_max, w_max)`` float in [0, 1] (zero padded). ``None`` (default): none.
            ``CLASPOutput.features`` stays the backbone's.
        keep_band_labels: also return the patch labels of every K of each band
            (``CLASPOutput.band_patch_labels``); no extra clustering, results unchanged.

    Shape:
        - input: ``(B, 3, H, W)`` tensor or a list of ``(3, H_i, W_i)`` tensors, uint8 in
          [0, 255] or float in [0, 1] (``ValueError`` outside ``[-1e-3, 1 + 1e-3]``, e.g. a
          ``0..255`` float image), RGB.
        - output: :class:`CLASPOutput`.

    Precision: ``model.half()`` / ``model.to(torch.bfloat16)`` work: the images are cast to the
    backbone's dtype, the features back to float32, and the spectral, clustering and CRF
    stages always run in float32/float64. (``amp_dtype`` runs the backbone under autocast
    instead, keeping float32 weights.)

    Example:
        >>> model = CLASP("efficientnet_lite0", refiner=None)  # doctest: +SKIP
        >>> out = model(torch.randint(0, 255, (2, 3, 240, 320), dtype=torch.uint8))  # doctest: +SKIP
        >>> out.labels.shape  # doctest: +SKIP
        torch.Size([2, 240, 320])
    """

    def __init__(
        self,
        backbone: str | nn.Module = "dinov2_vits14_reg",
        weights: str | os.PathLike | None = None,
        *,
        pretrained: bool = True,
        beta: float = 0.5,
        fixed_k: int | None = None,
        preset: str = "paper",
        n_init: int | None = None,
        max_iter: int | None = None,
        tol: float | None = None,
        seed: int = 0,
        max_patches: int = DEFAULT_MAX_PATCHES,
        eigen_method: EigenMethod = "auto",
        affinity: AffinityKind = "cosine",
        refiner: str | nn.Module | None = "crf",
        crf_params: dict[str, Any] | None = None,
        k_selector: KSelector = "eigengap",
        amp_dtype: torch.dtype | None = None,
        max_problems: int | None = None,
        crf_max_pixels: int = DEFAULT_CRF_MAX_PIXELS,
        crf_batch_pixels: int = DEFAULT_CRF_BATCH_PIXELS,
        keep_band_labels: bool = False,
        smoothing: str | nn.Module | None = None,
        smoothing_sigma: float | None = None,
        smoothing_sigma_color: float | None = None,
        smoothing_eps: float | None = None,
    ) -> None:
        super().__init__()
        if smoothing is not None and not isinstance(smoothing, (str, nn.Module)):
            raise ValueError(f"smoothing must be None, a kind name or an nn.Module, got {type(smoothing).__name__}")
        ps = resolve_preset(preset, n_init=n_init, max_iter=max_iter, tol=tol,
                            smoothing=smoothing if isinstance(smoothing, str) else None,
                            smoothing_sigma=smoothing_sigma,
                            smoothing_sigma_color=smoothing_sigma_color, smoothing_eps=smoothing_eps)
        self.settings = CLASPSettings(
            preset=preset, beta=beta, fixed_k=fixed_k, n_init=ps["n_init"], max_iter=ps["max_iter"], tol=ps["tol"],
            seed=seed, max_patches=max_patches,
            eigen_method=eigen_method, affinity=affinity, k_selector=k_selector, amp_dtype=amp_dtype,
            max_problems=max_problems, crf_max_pixels=crf_max_pixels, crf_batch_pixels=crf_batch_pixels,
            crf_params=dict(crf_params or {}), keep_band_labels=keep_band_labels,
            smoothing=ps.get("smoothing", "none"), smoothing_sigma=ps.get("smoothing_sigma", 1.0),
            smoothing_sigma_color=ps.get("smoothing_sigma_color"), smoothing_eps=ps.get("smoothing_eps"),
        )
        st = self.settings
        self.backbone: Backbone = get_backbone(backbone, weights=weights, pretrained=pretrained)
        self.backbone.eval()
        self.smoothing: nn.Module | None = (smoothing if isinstance(smoothing, nn.Module)
                                            else build_smoothing(st.as_dict()))
        self.embedding = SpectralEmbedding(beta=st.beta, method=st.eigen_method, affinity=st.affinity,  # type: ignore
                                           k_selector=st.k_selector, fixed_k=st.fixed_k)  # type: ignore[arg-type]
        self.clustering = KBandClustering(n_init=st.n_init, max_iter=st.max_iter, tol=st.tol, seed=st.seed,
                                          max_problems=st.max_problems, keep_band=st.keep_band_labels)
        self.refiner: nn.Module | None = _build_refiner(refiner, st)

    beta = _setting("beta")
    fixed_k = _setting("fixed_k")
    n_init = _setting("n_init")
    max_iter = _setting("max_iter")
    tol = _setting("tol")
    seed = _setting("seed")
    max_patches = _setting("max_patches", settable=True)
    eigen_method = _setting("eigen_method")
    affinity = _setting("affinity")
    k_selector = _setting("k_selector")
    amp_dtype = _setting("amp_dtype", settable=True)
    max_problems = _setting("max_problems")
    keep_band_labels = _setting("keep_band_labels")

    # ------------------------------------------------------------------ stages
    @property
    def device(self) -> torch.device:
        """The device of the backbone's parameters (CPU for a parameterless backbone)."""
        return self._device()

    def _device(self) -> torch.device:
        for t in self.backbone.parameters():
            return t.device
        for t in self.backbone.buffers():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def extract_features(self, imgs: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone features of ragged images.

        Images are resized (each side down to a multiple of the patch size, capped at
        ``max_patches``) and grouped by resized shape; each group is one backbone batch.

        Returns:
            ``features (B, h_max, w_max, D)`` (zero padded), ``patch_mask (B, h_max, w_max)``,
            ``grid_sizes (B, 2)``.
        """
        if len(imgs) == 0:
            raise ValueError("imgs is empty: pass at least one (3, H, W) image")
        bb = self.backbone
        p = bb.patch_size
        dev = imgs[0].device
        # resize + normalise each image (ragged sizes), then one backbone call per shape
        prepped = [preprocess_image(im, p, bb.mean, bb.std, self.max_patches)[0] for im in imgs]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(prepped):
            groups.setdefault((int(x.shape[-2]), int(x.shape[-1])), []).append(i)
        grids = torch.tensor([[int(x.shape[-2]) // p, int(x.shape[-1]) // p] for x in prepped], dtype=torch.long,
                             device="cpu")
        hm, wm = int(grids[:, 0].max()), int(grids[:, 1].max())
        feats: Tensor | None = None
        amp = (
            torch.autocast(device_type=dev.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        bb_dtype = next((t.dtype for t in bb.parameters() if t.is_floating_point()), torch.float32)
        for idx in groups.values():
            batch = torch.stack([prepped[i] for i in idx])
            if self.amp_dtype is None and batch.dtype != bb_dtype:
                batch = batch.to(bb_dtype)  # a model converted with .half() / .to(torch.bfloat16)
            with amp:
                out = bb(batch)
            h_g, w_g = batch.shape[-2] // p, batch.shape[-1] // p
            if not isinstance(out, Tensor) or out.dim() != 4 or tuple(out.shape[:3]) != (len(idx), h_g, w_g):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"backbone returned features of shape {got} for a batch of shape {tuple(batch.shape)}; "
                    f"expected (B, H/patch_size, W/patch_size, D) = ({len(idx)}, {h_g}, {w_g}, D)"
                )
            out = out.float()
            if feats is None:
                feats = out.new_zeros(len(imgs), hm, wm, out.shape[-1])
            feats[idx, : out.shape[1], : out.shape[2]] = out
        assert feats is not None
        ar_h = torch.arange(hm, device=dev).view(1, hm, 1)
        ar_w = torch.arange(wm, device=dev).view(1, 1, wm)
        g = grids.to(dev)
        pmask = (ar_h < g[:, 0].view(-1, 1, 1)) & (ar_w < g[:, 1].view(-1, 1, 1))
        return feats, pmask, grids

    def cluster_features(
        self, feats: Tensor, patch_mask: Tensor, single_segment: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, ClusterSelection]:
        """Spectral stage and K search on padded patch features.

        The patch grid ``(B, h_max, w_max, D)`` is flattened row-major with each image's real
        patches moved to the front (the layout the spectral stage expects).

        The stages are :attr:`embedding` (:class:`~clasp_torch.embedding.SpectralEmbedding`:
        spectrum, K_opt and each image's band, with the rules for degenerate images: one segment
        for images flagged in ``single_segment``, for images whose normalised feature rows all
        point the same way, and for images of 2 patches) and :attr:`clustering`
        (:class:`~clasp_torch.cluster.KBandClustering`: k-means + silhouette over the band).

        Args:
            feats: ``(B, h_max, w_max, D)`` float features (zero padded).
            patch_mask: ``(B, h_max, w_max)`` boolean, True on real patches (each image needs
                at least one).
            single_segment: optional ``(B,)`` boolean, force these images to one segment.

        Returns:
            ``(patch_labels (B, h_max, w_max), k_opt (B,), eigenvalues (B, N), selection)``.

        Raises:
            ValueError: wrong shapes, an image without patches, NaN/Inf features.
        """
        dims = check_shape(feats, "B h w D", "feats")
        B, hm, wm, D = feats.shape
        check_shape(patch_mask, "B h w", "patch_mask", sizes=dims)
        patch_mask = patch_mask.to(device=feats.device, dtype=torch.bool)
        if B and bool((patch_mask.reshape(B, -1).sum(-1) == 0).any()):
            raise ValueError("patch_mask: every image needs at least one real patch")
        flat_mask = patch_mask.reshape(B, hm * wm)
        # stable sort: real patches first, in row-major order
        order = torch.argsort((~flat_mask).to(torch.int8), dim=1, stable=True)
        f = feats.reshape(B, hm * wm, D).gather(1, order.unsqueeze(-1).expand(B, hm * wm, D))
        m = flat_mask.gather(1, order)
        emb = self.embedding(f, m, single_segment=single_segment)
        sel = self.clustering(emb.spectral, emb.k_lo, emb.k_hi)
        # scatter back to the grid layout
        lab = torch.full((B, hm * wm), -1, dtype=torch.long, device=feats.device)
        lab.scatter_(1, order, sel.labels)
        if sel.band_labels is not None:  # same layout for every K of the band: (B, Kc, h, w)
            Kc = sel.band_labels.shape[1]
            band = torch.full((B, Kc, hm * wm), -1, dtype=torch.long, device=feats.device)
            band.scatter_(2, order.unsqueeze(1).expand(B, Kc, hm * wm), sel.band_labels)
            sel.band_labels = band.view(B, Kc, hm, wm)
        return lab.view(B, hm, wm), emb.k_opt, emb.spectral.eigenvalues, sel

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, images: ImagesLike) -> CLASPOutput:
        """Segment a batch of images; see the class docstring for shapes."""
        imgs = [im.to(self._device()) for im in images_to_list(images)]
        image_sizes = torch.tensor([[int(im.shape[-2]), int(im.shape[-1])] for im in imgs], dtype=torch.long,
                                   device="cpu")
        feats, pmask, grids = self.extract_features(imgs)
        padded, imask = pad_images([to_uint8(im) for im in imgs])
        # A uniform image (one colour, up to UNIFORM_TOLERANCE grey levels) is one segment;
        # its features are not constant (zero padding / position embeddings vary over the grid)
        # so the feature-level test of cluster_features cannot see it.
        m4 = imask.unsqueeze(1)
        hi_px = padded.masked_fill(~m4, 0).amax((2, 3)).long()  # (B, 3)
        lo_px = padded.masked_fill(~m4, 255).amin((2, 3)).long()
        uniform = (hi_px - lo_px).amax(-1) <= UNIFORM_TOLERANCE
        feats_c = feats
        if self.smoothing is not None:
            guide = patch_guides(imgs, grids) if getattr(self.smoothing, "needs_guide", False) else None
            feats_c = self.smoothing(feats, pmask, guide)
        patch_labels, k_opt, evals, sel = self.cluster_features(feats_c, pmask, single_segment=uniform.to(feats.device))
        dev = feats.device
        coarse = upsample_labels(patch_labels, grids.to(dev), image_sizes.to(dev))
        labels = coarse
        if isinstance(self.refiner, CRFRefiner):  # ignores labels outside imask, writes -1 there: no full-size copies
            labels = self.refiner(padded, coarse, sel.k, imask)
        elif self.refiner is not None:
            labels = self.refiner(padded, coarse.clamp_min(0), sel.k, imask).masked_fill(~imask, -1)
        return CLASPOutput(
            labels=labels, patch_labels=patch_labels, k_opt=k_opt, k=sel.k, eigenvalues=evals,
            k_values=sel.k_values, silhouette=sel.scores, image_mask=imask, patch_mask=pmask,
            image_sizes=image_sizes.to(dev), grid_sizes=grids.to(dev), features=feats, coarse_labels=coarse,
            band_patch_labels=sel.band_labels,
        )

    def extra_repr(self) -> str:
        return f"max_patches={self.max_patches}, amp_dtype={self.amp_dtype}"


UNIFORM_TOLERANCE = 2
"""Images whose every channel spans at most this many grey levels (uint8 units) are one segment."""

def _build_refiner(refiner: str | nn.Module | None, settings: CLASPSettings) -> nn.Module | None:
    """The refiner stage: ``"crf"`` builds a :class:`~clasp_torch.crf_resolution.CRFRefiner` from
    the settings (``crf_params``, ``crf_max_pixels``, ``crf_batch_pixels``)."""
    if refiner is None or (isinstance(refiner, str) and refiner.lower() == "none"):
        return None
    if isinstance(refiner, nn.Module):
        return refiner
    if isinstance(refiner, str) and refiner.lower() == "crf":
        kw = {"max_pixels": settings.crf_max_pixels, "batch_pixels": settings.crf_batch_pixels,
              **dict(settings.crf_params)}
        return CRFRefiner(**kw)
    raise ValueError(f"refiner must be 'crf', None or an nn.Module, got {refiner!r}")
