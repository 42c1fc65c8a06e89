"""What video and static clip datasets share: configuration, sample keys and seeding, sample assembly.

The sample dict format is documented in ``corrvos/training/datasets.py`` (and docs/internals.md).

Determinism: a dataset item is requested with a ``SampleKey(index, step, max_skip)`` and all its
randomness comes from ``numpy.random.default_rng([seed, step, index])``, so a sample is a pure
function of (dataset seed, step, index, max_skip): a resumed run rebuilds exactly the samples an
uninterrupted run would have seen, whatever the number of loader workers. ``ClipSampler`` yields
such keys for a run of iterations (DDP-aware); plain ``int`` indices also work, with ``step``
taken from ``set_epoch`` and the max skip from ``set_max_skip`` (attributes a loader worker
sees as they were when the worker started).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from corrvos.imageops import IMAGENET_MEAN, IMAGENET_STD
from corrvos.training import augment as A
from corrvos.training.schedule import max_skip_at

# Max-skip curricula of upstream training (reference-models.md 3.2): (initial, values, fractions).
SKIP_CURRICULUM: dict[str, tuple[int, tuple[int, ...], tuple[float, ...]]] = {
    "stcn": (5, (10, 15, 20, 25, 5), (0.1, 0.2, 0.3, 0.4, 0.9)),
    "xmem": (5, (10, 15, 5), (0.1, 0.3, 0.9)),
}


def curriculum_max_skip(arch: str, iteration: int, total_iters: int) -> int:
    """Max skip of the upstream curriculum of ``arch`` ("stcn"/"xmem") at ``iteration`` of ``total_iters``."""
    initial, values, fractions = SKIP_CURRICULUM[arch]
    return max_skip_at(iteration, total_iters, initial, values, fractions)


@dataclass(frozen=True)
class ClipConfig:
    """How clips are sampled and augmented. ``ClipConfig.preset("stcn" | "xmem", crop_size=96)``."""

    num_frames: int = 3
    max_objects: int = 2
    frame_sampling: str = "stcn"          # "stcn": each frame +1..max_skip after the previous; "xmem": within ±max_skip of any chosen
    crop_size: int = 384
    interpolation: str = "bicubic"        # images; masks always nearest. STCN bicubic, XMem bilinear
    crop_scale: tuple[float, float] = (0.36, 1.0)   # RandomResizedCrop area fraction (video)
    frame_degrees: float = 15.0           # per-frame affine (video); 0 for XMem's finetune / BL30K
    frame_shear: float = 10.0
    tps_p: float = 0.33                   # static clips: probability of a thin-plate-spline warp per frame
    second_view: bool = True              # PCL cross-view anchor of frame 0
    view_side_scale: tuple[float, float] = (0.5, 1.0)
    max_proposals: int = 64               # proposal boxes per frame (rows padded with -1)
    max_annotated: int = 8                # annotated-object boxes per clip (rows padded with -1)
    min_box_fraction: float = 0.04        # drop transformed boxes with a side below this fraction of the crop
    min_object_pixels: int | None = None  # None: 100 px at a 384 crop, scaled with the crop area
    max_trials: int = 5                   # re-draws when no object is large enough in frame 0

    @classmethod
    def preset(cls, arch: str, **overrides) -> "ClipConfig":
        """Upstream settings: "stcn" = 3 frames, 2 objects, bicubic; "xmem" = 8 frames, 3 objects, bilinear."""
        base = {"stcn": cls(), "xmem": cls(num_frames=8, max_objects=3, frame_sampling="xmem", interpolation="bilinear")}
        if arch not in base:
            raise ValueError(f"unknown clip preset {arch!r} (expected 'stcn' or 'xmem')")
        return replace(base[arch], **overrides)

    @property
    def min_pixels(self) -> int:
        if self.min_object_pixels is not None:
            return self.min_object_pixels
        return max(4, round(100 * (self.crop_size / 384) ** 2))


class SampleKey(NamedTuple):
    """What a dataset item depends on besides the dataset's seed (see the module docstring)."""

    index: int
    step: int = 0
    max_skip: int | None = None  # None: the dataset's current ``max_skip``


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(step), int(index)])


class ClipDataset(Dataset):
    """Base of the clip datasets: key resolution and the curriculum/epoch attributes.

    Subclasses implement ``__len__`` and ``make(index, rng, max_skip) -> dict``.
    """

    def __init__(self, config: ClipConfig, seed: int = 0, max_skip: int = 5):
        self.config = config
        self.seed = seed
        self.max_skip = max_skip
        self.epoch = 0

    def set_max_skip(self, max_skip: int) -> None:
        """Max frame distance for int-indexed items (the trainer's curriculum; see ``curriculum_max_skip``)."""
        self.max_skip = int(max_skip)

    def set_epoch(self, epoch: int) -> None:
        """``step`` used for int-indexed items, so that each epoch draws new clips."""
        self.epoch = int(epoch)

    def resolve(self, key: int | SampleKey | Sequence[int]) -> tuple[int, int, int]:
        if isinstance(key, (int, np.integer)):
            return int(key), self.epoch, self.max_skip
        key = SampleKey(*key)
        return key.index, key.step, self.max_skip if key.max_skip is None else key.max_skip

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, step, max_skip = self.resolve(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        sample = self.make(index, sample_rng(self.seed, step, index), max_skip)
        sample["index"], sample["step"] = index, step
        return sample

    def make(self, index: int, rng: np.random.Generator, max_skip: int) -> dict:
        raise NotImplementedError


class ConcatClips(ClipDataset):
    """Several clip datasets as one, each repeated ``repeats[i]`` times (upstream: DAVIS x5 + YouTube-VOS).

    A repeated item gets its own random stream because the rng is seeded with the global index.
    """

    def __init__(self, datasets: Sequence[ClipDataset], repeats: Sequence[int] | None = None, seed: int = 0):
        super().__init__(datasets[0].config, seed)
        self.datasets = list(datasets)
        self.repeats = list(repeats or [1] * len(datasets))
        self._ends = np.cumsum([len(d) * r for d, r in zip(self.datasets, self.repeats)])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def set_max_skip(self, max_skip: int) -> None:
        super().set_max_skip(max_skip)
        for d in self.datasets:
            d.set_max_skip(max_skip)

    def make(self, index: int, rng: np.random.Generator, max_skip: int) -> dict:
        d = int(np.searchsorted(self._ends, index, side="right"))
        local = (index - (int(self._ends[d - 1]) if d else 0)) % len(self.datasets[d])
        return self.datasets[d].make(local, rng, max_skip)


class ClipSampler(Sampler):
    """Yields the ``SampleKey``s of iterations ``start_step .. total_steps - 1`` (infinite if None).

    Use with ``DataLoader(dataset, batch_size=batch_size, sampler=ClipSampler(...))``: each batch is
    one iteration. Items are drawn without replacement from a fresh permutation per pass over the
    data; the global slot of sample ``b`` of rank ``r`` at step ``s`` is
    ``(s * world_size + r) * batch_size + b``, so ranks never share samples and the keys are a pure
    function of (seed, step, rank): resuming at ``start_step`` continues exactly.
    ``max_skip_fn(step)`` (e.g. ``lambda s: curriculum_max_skip("stcn", s, total)``) puts the
    curriculum into the keys, which makes it work with persistent workers too.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_step: int = 0,
                 total_steps: int | None = None, rank: int = 0, world_size: int = 1,
                 max_skip_fn: Callable[[int], int] | None = None):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size, self.max_skip_fn = rank, world_size, max_skip_fn
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an infinite ClipSampler has no length")
        return max(0, self.total_steps - self.start_step) * self.batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_items)}
        return self._perm_cache[epoch]

    def keys(self, step: int) -> list[SampleKey]:
        skip = self.max_skip_fn(step) if self.max_skip_fn else None
        out = []
        for b in range(self.batch_size):
            slot = (step * self.world_size + self.rank) * self.batch_size + b
            epoch, pos = divmod(slot, self.num_items)
            out.append(SampleKey(int(self._perm(epoch)[pos]), step, skip))
        return out

    def __iter__(self) -> Iterator[SampleKey]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            yield from self.keys(step)
            step += 1


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the global RNGs per worker and keep each worker single-threaded.

    Clip randomness does not use global RNGs (see ``SampleKey``); this only protects third-party
    code that might, and stops OpenCV/torch threads from oversubscribing the cores.
    """
    import cv2

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- assembly

@dataclass
class WarpedClip:
    """A clip after geometry, before colour: what the dataset classes produce for ``assemble``."""

    images: list[np.ndarray]                 # T x (S, S, 3) uint8
    labels: list[np.ndarray]                 # T x (S, S) uint8 original object ids
    colors: list[tuple[A.ColorOps, ...]]     # per frame: sequence-level ops, then the frame's own
    proposals: list[np.ndarray]              # T x (n, 4) crop edge coordinates, already filtered
    name: str = ""
    frame_indices: list[int] = field(default_factory=list)


_NORM_MATRIX = np.concatenate([np.diag(1.0 / np.array(IMAGENET_STD)),
                               (-np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD))[:, None]], 1).astype(np.float32)


def apply_colors(ops: Sequence[A.ColorOps], image: np.ndarray) -> np.ndarray:
    """uint8 ``HxWx3`` frame -> ImageNet-normalised float32 ``HxWx3`` after the colour ops (sequence-level first).

    Same values as ``corrvos.imageops.normalize`` of the [0, 1] image; done here with one OpenCV
    colour-matrix pass because this runs for every frame of every training sample.
    """
    x = A.to_float_rgb(image)
    for op in ops:
        x = op(x)
    return cv2.transform(x, _NORM_MATRIX)


def to_chw_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``HxWx3`` float32 arrays -> one contiguous ``(N, 3, H, W)`` tensor (a single copy)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def present_ids(labels: np.ndarray, min_pixels: int = 1) -> list[int]:
    """Non-zero label ids with at least ``min_pixels`` pixels, ascending (a histogram, not a sort)."""
    counts = np.bincount(labels.ravel(), minlength=1)
    return [int(i) for i in np.flatnonzero(counts >= min_pixels) if i != 0]


def candidate_objects(labels0: np.ndarray, min_pixels: int) -> list[int]:
    """Object ids of frame 0 that cover at least ``min_pixels`` pixels."""
    return present_ids(labels0, max(1, min_pixels))


def select_proposals(rng: np.random.Generator, boxes: np.ndarray, crop: int, config: ClipConfig) -> np.ndarray:
    """Clip transformed proposals to the crop, drop tiny/mostly-outside ones, keep at most ``max_proposals``."""
    boxes, keep = A.clip_boxes(boxes, (crop, crop), config.min_box_fraction * crop)
    boxes = boxes[keep]
    if len(boxes) > config.max_proposals:
        boxes = boxes[np.sort(rng.choice(len(boxes), config.max_proposals, replace=False))]
    return boxes


def assemble(clip: WarpedClip, objects: list[int], rng: np.random.Generator, config: ClipConfig) -> dict:
    """Turn a warped clip and the chosen object ids into the sample dict (see datasets.py)."""
    t_count, s, k_max = len(clip.images), config.crop_size, config.max_objects
    labels = np.stack(clip.labels)
    masks = np.zeros((t_count, k_max, s, s), np.float32)
    cls_gt = np.zeros((t_count, s, s), np.int64)
    object_ids = np.full(k_max, -1, np.int64)
    for k, obj in enumerate(objects[:k_max]):
        m = labels == obj
        masks[:, k] = m
        cls_gt[m] = k + 1
        object_ids[k] = obj
    n_obj = min(len(objects), k_max)
    selector = np.zeros(k_max, np.float32)
    selector[:n_obj] = 1

    present = present_ids(labels)
    annotated = list(object_ids[:n_obj]) + [i for i in present if i not in objects[:k_max]]
    annotated = annotated[: config.max_annotated]
    object_boxes = np.full((t_count, config.max_annotated, 4), -1.0, np.float32)
    for t in range(t_count):
        object_boxes[t, : len(annotated)] = A.boxes_from_labels(clip.labels[t], annotated)
    box_ids = np.full(config.max_annotated, -1, np.int64)
    box_ids[: len(annotated)] = annotated

    boxes = np.full((t_count, config.max_proposals, 4), -1.0, np.float32)
    num_boxes = np.zeros(t_count, np.int64)
    for t, b in enumerate(clip.proposals):
        boxes[t, : len(b)] = b
        num_boxes[t] = len(b)

    rgb = to_chw_tensor([apply_colors(c, im) for c, im in zip(clip.colors, clip.images)])
    sample = {
        "rgb": rgb,
        "masks": torch.from_numpy(masks),
        "cls_gt": torch.from_numpy(cls_gt),
        "selector": torch.from_numpy(selector),
        "num_objects": torch.tensor(n_obj, dtype=torch.int64),
        "object_ids": torch.from_numpy(object_ids),
        "boxes": torch.from_numpy(boxes),
        "num_boxes": torch.from_numpy(num_boxes),
        "object_boxes": torch.from_numpy(object_boxes),
        "object_box_ids": torch.from_numpy(box_ids),
        "frame_indices": torch.tensor(clip.frame_indices or list(range(t_count)), dtype=torch.int64),
        "name": clip.name,
    }
    if config.second_view:
        g = A.random_second_view(rng, s, config.view_side_scale)
        view2 = A.warp_image(clip.images[0], g, (s, s), config.interpolation)
        sample["view2_rgb"] = to_chw_tensor([apply_colors(clip.colors[0], view2)])[0]
        sample["view2_theta"] = torch.from_numpy(A.grid_theta(g, (s, s))).float()
        sample["view2_theta_inv"] = torch.from_numpy(A.grid_theta(np.linalg.inv(g), (s, s))).float()
    return sample
