"""One vision-tower pass per distinct image of a rollout batch, shared by the rows that show it.

A GRPO group is one prompt sampled ``n`` times, so a batch of ``prompts x n`` rows holds each
image ``n`` times, and the training forward would run the vision tower on every copy. Here the
tower runs once per distinct image and every row's forward reads those features instead:

- :func:`distinct_images` finds the copies: images of rows with the same ``group_ids`` whose
  grids and patches are equal (compared, not assumed, so a caller that reuses group ids for
  different prompts gets no wrong sharing - only less of it);
- :class:`SharedVision` computes the distinct images' features (the merged image embeddings and
  the deepstack features) and, inside :meth:`SharedVision.serving`, patches the model's
  ``get_image_features`` to hand each micro-batch the slices of those features for its rows.

With gradients (``train=True``) the features are leaves: every micro-batch's backward adds its
share of d loss / d feature into their ``.grad``, and :meth:`SharedVision.backward` then runs the
tower once more on the distinct images and back-propagates the summed gradients through it, a
chunk of images at a time. By the chain rule the tower's gradient is the sum over the feature's
uses, so this equals the per-row computation up to float summation order; the tower's work drops
from ``rows`` images to ``distinct`` images times (forward + forward + backward), ~n-fold for
GRPO groups of n. The memory it holds between micro-batches is the features and their
gradients (tokens x hidden per feature level), not the tower's activations.

Under torchrun (FSDP2) the tower sits in the root unit, whose weights are gathered only in the
root's forward: the tower runs through ``vision_features``, a forward method that
``distributed.shard_model`` registers on the root. Every tower call is then collective, so all
ranks make the same number of them: sharing is on everywhere when any rank's rows hold an
image, and a rank with fewer chunks of distinct images (none, say) runs a one-token dummy image
instead, with zero gradient.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

from .. import distributed as D
from ..distributed import vision_owner
from .loading import autocast_for

__all__ = ["SharedVision", "distinct_images", "shared_vision", "vision_owner"]


def _offsets(sizes) -> list[int]:
    """Start of each item and the end of the last: ``[0, s0, s0 + s1, ...]``."""
    return list(itertools.accumulate(sizes, initial=0))


def _patch_offsets(ro) -> list[int]:
    """Start of each image's patches in ``ro.pixel_values`` (and their total, last)."""
    return _offsets(ro.image_grid_thw.prod(-1).tolist())


def distinct_images(ro, rows: list[int]) -> tuple[list[int], list[int]]:
    """``(image_of, firsts)`` for the images of ``rows`` in row order: ``image_of[i]`` is the
    position in ``firsts`` of image i's distinct copy, ``firsts`` the global image index (into
    ``ro.image_grid_thw``) of each distinct image's first occurrence. Two images are the same
    when their rows share a group id, they sit at the same position in their rows, and their
    grids and patches are equal."""
    per_row, imgs_per_row = ro.extras["patches_per_row"], ro.extras["images_per_row"]
    img_off, p_off = _offsets(imgs_per_row), _patch_offsets(ro)
    if p_off[-1] != sum(per_row) or p_off[-1] != ro.pixel_values.shape[0]:
        raise ValueError(f"rollouts hold {ro.pixel_values.shape[0]} image patches, patches_per_row sums to "
                         f"{sum(per_row)} and image_grid_thw to {p_off[-1]}: the image inputs are inconsistent")
    groups = ro.group_ids.tolist()
    seen: dict[tuple[int, int], list[int]] = {}   # (group, position in row) -> distinct slots
    image_of: list[int] = []
    firsts: list[int] = []
    for r in rows:
        for pos in range(imgs_per_row[r]):
            g = img_off[r] + pos
            slot = next((s for s in seen.get((groups[r], pos), []) if _same(ro, p_off, firsts[s], g)), None)
            if slot is None:
                slot = len(firsts)
                firsts.append(g)
                seen.setdefault((groups[r], pos), []).append(slot)
            image_of.append(slot)
    return image_of, firsts


def _same(ro, p_off: list[int], a: int, b: int) -> bool:
    if a == b:
        return True
    return (torch.equal(ro.image_grid_thw[a], ro.image_grid_thw[b])
            and torch.equal(ro.pixel_values[p_off[a]:p_off[a + 1]], ro.pixel_values[p_off[b]:p_off[b + 1]]))


def shared_vision(model, ro, rows: list[int], device: torch.device, *, chunk: int = 32) -> SharedVision | None:
    """A :class:`SharedVision` for ``rows`` when it saves work - the rows hold images and some
    are copies - else None (the forwards then run the tower per row as before). Gradients flow
    into the tower when grad mode is on and any tower parameter requires one. Under torchrun
    the decision is global: on for every rank when any rank's rows hold an image."""
    owner = vision_owner(model)
    if owner is None:
        return None
    mine = ro.pixel_values is not None and any(ro.extras["images_per_row"][r] for r in rows)
    if D.is_distributed():
        if not D.all_reduce_max(float(mine))[0]:
            return None
    elif not mine:
        return None
    distinct = distinct_images(ro, rows) if mine else ([], [])
    if not D.is_distributed() and len(distinct[1]) == len(distinct[0]):
        return None
    train = torch.is_grad_enabled() and any(p.requires_grad for p in owner.visual.parameters())
    return SharedVision(model, ro, rows, device, train=train, chunk=chunk, distinct=distinct)


def _flat(out) -> tuple[list[torch.Tensor], list[str]]:
    """``get_image_features``' output as flat (tokens, hidden) tensors, the merged embeddings first,
    then each deepstack level, and how each deepstack level came back (one tensor, or a tuple per
    image: transformers versions differ)."""
    kind = ["tuple" if isinstance(f, (tuple, list)) else "tensor" for f in out.deepstack_features]
    flat = [torch.cat(out.pooler_output)] + [torch.cat(f) if k == "tuple" else f
                                             for f, k in zip(out.deepstack_features, kind)]
    return flat, kind


class SharedVision:
    """The vision features of ``rows``' distinct images, served to the forwards of those rows.

    ``chunk``: images per vision-tower call when computing or back-propagating (bounds the
    tower's activation memory whatever the number of distinct images).
    """

    def __init__(self, model, ro, rows: list[int], device: torch.device, *, train: bool, chunk: int = 32,
                 distinct: tuple[list[int], list[int]] | None = None):
        self.model, self.owner = model, vision_owner(model)
        if self.owner is None:
            raise ValueError("SharedVision needs a model with a vision tower (a `visual` child and get_image_features)")
        self.device, self.train, self.chunk = device, train, chunk
        self.image_of, firsts = distinct or distinct_images(ro, rows)
        self.row_images = self._row_images(ro, rows)
        self.pixels, self.grids = [], []
        if firsts:
            starts = _patch_offsets(ro)
            self.pixels = [ro.pixel_values[starts[g]:starts[g + 1]] for g in firsts]
            self.grids = [ro.image_grid_thw[g:g + 1] for g in firsts]
        self.merge = self.owner.visual.spatial_merge_size ** 2
        self.distributed = D.is_distributed()
        chunks = -(-len(firsts) // chunk)
        self.chunks = int(D.all_reduce_max(chunks)[0]) if self.distributed else chunks
        self.kind: list[str] = []
        with torch.no_grad():
            self.levels = self._features(0, len(firsts))
            for _ in range(self.chunks - chunks):   # the other ranks' extra collective tower calls
                self._tower(*self._dummy())
        D.reshard(self.model)   # a no-grad root forward leaves the root gathered (see distributed.reshard)
        if train:
            self.levels = [t.detach().requires_grad_() for t in self.levels]
        self.tok_off = _offsets(int(g.prod()) // self.merge for g in self.grids)   # each image's merged tokens

    @staticmethod
    def _row_images(ro, rows: list[int]) -> dict[int, range]:
        """Row -> the range of its images in the ``rows``-order image list."""
        out, at = {}, 0
        for r in rows:
            k = ro.extras["images_per_row"][r]
            out[r] = range(at, at + k)
            at += k
        return out

    @property
    def distinct(self) -> int:
        return len(self.pixels)

    @property
    def images(self) -> int:
        return len(self.image_of)

    def _tower(self, pix: torch.Tensor, thw: torch.Tensor):
        """``get_image_features`` of the model's own code; under FSDP2 through the root's registered
        ``vision_features`` so that the root's weights are gathered."""
        fn = getattr(self.model, "vision_features", None)   # registered by distributed.shard_model
        with autocast_for(self.device):
            if fn is not None:
                return fn(pix.to(self.device), thw.to(self.device))
            return D.vision_features(self.model, pix.to(self.device), thw.to(self.device))

    def _dummy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One image of one merged token (m x m patches of zeros) for a rank's extra tower calls."""
        cfg = self.owner.visual.config
        m = cfg.spatial_merge_size
        dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        return torch.zeros(m * m, dim), torch.tensor([[1, m, m]])

    def _features(self, lo: int, hi: int) -> list[torch.Tensor]:
        """Features of distinct images ``lo:hi`` as flat (tokens, hidden) tensors, one per level
        (:func:`_flat`), computed ``chunk`` images at a time."""
        parts: list[list[torch.Tensor]] = []
        for s in range(lo, hi, self.chunk):
            e = min(hi, s + self.chunk)
            out = self._tower(torch.cat(self.pixels[s:e]), torch.cat(self.grids[s:e]))
            flat, self.kind = _flat(out)
            parts.append(flat)
            self.output_type = type(out)
        return [torch.cat(level) for level in zip(*parts)]

    def _slices(self, level: torch.Tensor, images: list[int]) -> list[torch.Tensor]:
        return [level[self.tok_off[u]:self.tok_off[u + 1]] for u in images]

    def _served(self, images: list[int]):
        """``get_image_features``' output for ``images`` (distinct slots, in the forward's order)."""
        pooled = tuple(self._slices(self.levels[0], images))
        deep = []
        for level, k in zip(self.levels[1:], self.kind):
            pieces = self._slices(level, images)
            deep.append(tuple(pieces) if k == "tuple" else torch.cat(pieces))
        return self.output_type(pooler_output=pooled, deepstack_features=deep)

    @contextlib.contextmanager
    def serving(self, rows: list[int]) -> Iterator[None]:
        """Inside the block, the model's vision features for a forward over ``rows`` (in this
        order, each one of the rows given at construction) come from the shared features."""
        images = [self.image_of[i] for r in rows for i in self.row_images[r]]
        expected = sum(int(self.grids[u].prod()) for u in images)

        def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
            if int(pixel_values.shape[0]) != expected or int(image_grid_thw.shape[0]) != len(images):
                raise RuntimeError(f"shared vision features were set up for {len(images)} images of {expected} "
                                   f"patches, the forward brought {int(image_grid_thw.shape[0])} of "
                                   f"{int(pixel_values.shape[0])}")
            return self._served(images)

        self.owner.get_image_features = get_image_features
        try:
            yield
        finally:
            self.owner.__dict__.pop("get_image_features", None)

    def backward(self) -> None:
        """Back-propagate the gradients the forwards left on the shared features through the
        vision tower (recomputed ``chunk`` images at a time); a no-op without gradients (under
        torchrun the calls are made anyway, with zero gradients: they are collective)."""
        if not self.train:
            return
        grads = [t.grad for t in self.levels]
        if not self.distributed and all(g is None for g in grads):
            return
        for c in range(self.chunks):
            s, e = c * self.chunk, min(self.distinct, (c + 1) * self.chunk)
            if s >= e:   # this rank has no more distinct images: the dummy call the others wait for
                outs, _ = _flat(self._tower(*self._dummy()))
                torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])
                continue
            lo, hi = self.tok_off[s], self.tok_off[e]
            outs = self._features(s, e)
            gs = [torch.zeros_like(o) if g is None else g[lo:hi].to(o.dtype) for o, g in zip(outs, grads)]
            torch.autograd.backward(outs, gs)
        for t in self.levels:
            t.grad = None
