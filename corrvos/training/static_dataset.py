"""Synthetic clips made from single images with a mask (static pretraining, reference-models.md 3.3).

Each item is one (image, mask) pair; every request deforms it into ``num_frames`` frames:
sequence level: affine zoom 0.8-1.5 + horizontal flip, ColorJitter(0.1, 0.05, 0.05, 0.05),
RandomGrayscale(0.05); per frame: affine (±20 degrees, zoom 0.9-1.1, x-shear ±10), resize of the
short side to the crop size, random crop, ColorJitter(0.1, 0.05, 0.05, 0), and with p = 0.33 a
thin-plate-spline warp. One object per clip (upstream stage 0); a multi-object mask contributes
one of its objects, drawn per request. Sample format: datasets.py.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corrvos.errors import DatasetError
from corrvos.io.davis import read_annotation
from corrvos.training import augment as A
from corrvos.training.framestore import FrameStore
from corrvos.training.layouts import find_sequences, read_rgb
from corrvos.training.proposals import ProposalCache, load_proposals
from corrvos.training.samples import (ClipConfig, ClipDataset, WarpedClip, assemble, candidate_objects,
                                      present_ids, select_proposals)


@dataclass(frozen=True)
class FrameRef:
    """Frame ``row`` of sequence ``seq`` of a :class:`FrameStore`: image and mask of a static item in one."""

    store: FrameStore
    seq: int
    row: int


ImageSource = str | os.PathLike | np.ndarray | FrameRef
StaticItem = tuple[ImageSource, ImageSource] | tuple[ImageSource, ImageSource, str | None]


class StaticClips(ClipDataset):
    """Synthetic clips from ``(image, mask[, proposal key])`` items (paths or arrays).

    Images are RGB uint8 ``HxWx3``; masks are label maps (uint8 ``HxW``: 0 background) or mask
    files (greyscale >= 128 is the object, palette index = object id). The optional key
    (``"<seq>/<frame>"``) looks the frame up in the proposal cache.
    """

    def __init__(self, items: Sequence[StaticItem], config: ClipConfig | None = None,
                 proposals: ProposalCache | str | os.PathLike | None = None, seed: int = 0):
        super().__init__(config or ClipConfig(max_objects=1), seed)
        if not items:
            raise DatasetError("The static dataset got no (image, mask) pairs; check the folder or list you passed.")
        self.items = [(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        self.proposals = load_proposals(proposals) if isinstance(proposals, (str, os.PathLike)) else proposals

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, mask_folder: str | os.PathLike | None = None, **kwargs) -> "StaticClips":
        """Pairs ``name.jpg`` (or .jpeg/.png) with the mask ``name.png`` in ``mask_folder`` (default: the same folder)."""
        folder = Path(folder)
        mask_folder = Path(mask_folder) if mask_folder else folder
        if not folder.is_dir():
            raise DatasetError(f"The static image folder {folder} does not exist.")
        items = []
        for img in sorted(folder.iterdir()):
            if img.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            mask = mask_folder / f"{img.stem}.png"
            if mask.is_file() and mask != img:
                items.append((img, mask, None))
        if not items:
            raise DatasetError(f"No image in {folder} has a mask of the same name (name.png) in {mask_folder}.")
        return cls(items, **kwargs)

    @classmethod
    def from_video_layout(cls, root: str | os.PathLike, split: str = "train", sequences: Sequence[str] | str | None = None,
                          every: int = 1, cache_dir: str | os.PathLike | None = None, **kwargs) -> "StaticClips":
        """Every ``every``-th annotated frame of a DAVIS / YouTube-VOS / compact folder as a static image."""
        seqs = find_sequences(root, split, sequences, cache_dir)
        items = [(f, m, k) for s in seqs for f, m, k in list(zip(s.frames, s.masks, s.keys))[::every]]
        return cls(items, **kwargs)

    @classmethod
    def from_store(cls, store: FrameStore, sequences: Sequence[str] | None = None, every: int = 1,
                   **kwargs) -> "StaticClips":
        """Every ``every``-th frame of a :class:`FrameStore` (decoded once, memory-mapped) as a static image."""
        items = [(ref, ref, key) for i in store.select(sequences)
                 for ref, key in [(FrameRef(store, i, r), k) for r, k in enumerate(store.sequences[i].keys)][::every]]
        return cls(items, **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, str | None]:
        image, mask, key = self.items[index]
        if isinstance(image, FrameRef):
            return image.store.rgb(image.seq)[image.row], image.store.labels(image.seq)[image.row], key
        image = read_rgb(image) if not isinstance(image, np.ndarray) else image
        labels = read_annotation(mask) if not isinstance(mask, np.ndarray) else mask.astype(np.uint8)
        if image.shape[:2] != labels.shape:
            raise DatasetError(f"Static item {index}: the image is {image.shape[:2]} but its mask is {labels.shape}.")
        return image, labels, key

    def make(self, index: int, rng: np.random.Generator, max_skip: int) -> dict:
        cfg = self.config
        s = cfg.crop_size
        image, all_labels, key = self._load(index)
        h, w = all_labels.shape
        ids = present_ids(all_labels)
        # One object per clip: the others become background (upstream static data is single-object).
        labels = (all_labels == ids[int(rng.integers(len(ids)))]).astype(np.uint8) if ids else all_labels * 0
        source_boxes = np.zeros((0, 4))
        if self.proposals is not None and key is not None:
            source_boxes = self.proposals.get(key) * np.array([w, h, w, h])
        r = s / min(h, w)
        for _ in range(cfg.max_trials):
            seq_m = A.random_affine(rng, w / 2, h / 2, zoom=(0.8, 1.5))
            if rng.random() < 0.5:
                seq_m = A.hflip(w) @ seq_m
            seq_color = A.sample_color(rng, 0.1, 0.05, 0.05, 0.05, grayscale_p=0.05)
            clip = WarpedClip([], [], [], [], str(key or index), [0] * cfg.num_frames)
            for _t in range(cfg.num_frames):
                frame_m = A.random_affine(rng, w / 2, h / 2, degrees=20, zoom=(0.9, 1.1), shear=10)
                rw, rh = w * r, h * r
                cx = rng.uniform(0, max(0.0, rw - s))
                cy = rng.uniform(0, max(0.0, rh - s))
                m = A.translate(-round(cx), -round(cy)) @ A.scale(r) @ frame_m @ seq_m
                im = A.warp_image(image, m, (s, s), cfg.interpolation)
                lab = A.warp_labels(labels, m, (s, s))
                boxes = A.warp_boxes(source_boxes, m)
                if rng.random() < cfg.tps_p:
                    tps = A.random_tps(rng, (s, s))
                    im, lab, boxes = tps.image(im, cfg.interpolation), tps.labels(lab), tps.boxes(boxes)
                clip.images.append(im)
                clip.labels.append(lab)
                clip.colors.append((seq_color, A.sample_color(rng, 0.1, 0.05, 0.05, 0.0)))
                clip.proposals.append(select_proposals(rng, boxes, s, cfg))
            if candidate_objects(clip.labels[0], cfg.min_pixels):
                break
        objects = [1] if candidate_objects(clip.labels[0], cfg.min_pixels) else []
        return assemble(clip, objects, rng, cfg)
