"""Clips of real videos (DAVIS-2016/2017, YouTube-VOS, the compact DAVIS-2016 copy) for main training.

One item per sequence, as upstream: each request draws a new clip of that sequence.
Sampling and augmentation follow reference-models.md 3.2-3.3; sample format: datasets.py.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from corrvos.io.davis import read_annotation
from corrvos.training import augment as A
from corrvos.training.framestore import FrameStore, StoredSequence
from corrvos.training.layouts import VideoSequence, find_sequences, read_rgb
from corrvos.training.proposals import ProposalCache, load_proposals
from corrvos.training.samples import (ClipConfig, ClipDataset, WarpedClip, assemble, candidate_objects,
                                      select_proposals)


def sample_frames_stcn(rng: np.random.Generator, n: int, count: int, max_skip: int) -> list[int]:
    """Frame 0 uniform; each later frame 1 + rand(0..max_skip) after the previous (as upstream), inside the video.

    The start is drawn so that the clip fits; a later frame is clamped to leave room for the
    frames still to come, so all indices are distinct and increasing.
    """
    jump = max(1, max_skip)
    idx = [int(rng.integers(0, n - count + 1))]
    for i in range(1, count):
        nxt = idx[-1] + 1 + int(rng.integers(0, jump + 1))
        idx.append(min(nxt, n - (count - i)))
    return idx


def sample_frames_xmem(rng: np.random.Generator, n: int, count: int, max_skip: int) -> list[int]:
    """Grow a set: each new frame is uniform among unused frames within ±max_skip of any chosen one; sorted."""
    jump = max(1, max_skip)
    chosen = {int(rng.integers(0, n))}
    while len(chosen) < count:
        near = set()
        for f in chosen:
            near.update(range(max(0, f - jump), min(n, f + jump + 1)))
        pool = sorted(near - chosen)
        chosen.add(pool[int(rng.integers(0, len(pool)))])
    return sorted(chosen)


class VideoClips(ClipDataset):
    """Training clips of a DAVIS / YouTube-VOS / compact DAVIS-2016 folder.

    ``VideoClips(root, ClipConfig.preset("stcn", crop_size=96), sequences=["bear"], proposals="p.npz")``.
    ``proposals`` is a cache file from ``python -m corrvos.training.proposals`` (or a loaded
    ``ProposalCache``); without it the ``boxes`` of a sample are all padding.
    """

    def __init__(self, root: str | os.PathLike | FrameStore, config: ClipConfig | None = None, split: str = "train",
                 sequences: Sequence[str] | str | None = None, proposals: ProposalCache | str | os.PathLike | None = None,
                 seed: int = 0, max_skip: int = 5, cache_dir: str | os.PathLike | None = None):
        super().__init__(config or ClipConfig(), seed, max_skip)
        count = self.config.num_frames
        self.store = root if isinstance(root, FrameStore) else None
        if self.store is not None:
            # Decoded frames (framestore.py): the store already holds the split; ``sequences`` narrows it.
            names = [sequences] if isinstance(sequences, str) else sequences
            rows = [i for i in self.store.select(names) if len(self.store.sequences[i]) >= count]
            self._store_rows = rows
            self.sequences: list[VideoSequence | StoredSequence] = [self.store.sequences[i] for i in rows]
        else:
            seqs = find_sequences(root, split, sequences, cache_dir)
            self.sequences = [s for s in seqs if len(s.frames) >= count]
        if not self.sequences:
            from corrvos.errors import DatasetError

            raise DatasetError(f"No sequence under {root} has {count} annotated frames; "
                               "use more sequences or fewer frames per clip.")
        self.proposals = load_proposals(proposals) if isinstance(proposals, (str, os.PathLike)) else proposals

    def __len__(self) -> int:
        return len(self.sequences)

    def _read(self, index: int, idx: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The clip's frames and label maps (from the store: views into its memory maps, no copy)."""
        if self.store is not None:
            row = self._store_rows[index]
            rgb, labels = self.store.rgb(row), self.store.labels(row)
            return [rgb[i] for i in idx], [labels[i] for i in idx]
        seq = self.sequences[index]
        return [read_rgb(seq.frames[i]) for i in idx], [read_annotation(seq.masks[i]) for i in idx]

    def _frame_indices(self, rng: np.random.Generator, seq: VideoSequence | StoredSequence, max_skip: int) -> list[int]:
        skip = max(1, max_skip // seq.skip_divisor)
        n, count = len(seq.keys), self.config.num_frames
        if self.config.frame_sampling == "xmem":
            idx = sample_frames_xmem(rng, n, count, skip)
        else:
            idx = sample_frames_stcn(rng, n, count, skip)
        return idx[::-1] if rng.random() < 0.5 else idx

    def make(self, index: int, rng: np.random.Generator, max_skip: int) -> dict:
        cfg, seq = self.config, self.sequences[index]
        s = cfg.crop_size
        for _ in range(cfg.max_trials):
            idx = self._frame_indices(rng, seq, max_skip)
            images, labels = self._read(index, idx)
            h, w = labels[0].shape

            # Sequence level: flip + RandomResizedCrop (one matrix for the whole clip).
            flip = A.hflip(w) if rng.random() < 0.5 else np.eye(3)
            x0, y0, cw, ch = A.random_resized_crop_window(rng, w, h, cfg.crop_scale)
            seq_m = A.resized_crop(x0, y0, cw, ch, s, s) @ flip
            seq_color = A.sample_color(rng, 0.1, 0.03, 0.03, 0.0, grayscale_p=0.05)

            clip = WarpedClip([], [], [], [], seq.name, idx)
            for t, i in enumerate(idx):
                m = A.random_affine(rng, s / 2, s / 2, degrees=cfg.frame_degrees, shear=cfg.frame_shear) @ seq_m
                clip.images.append(A.warp_image(images[t], m, (s, s), cfg.interpolation))
                clip.labels.append(A.warp_labels(labels[t], m, (s, s)))
                clip.colors.append((seq_color, A.sample_color(rng, 0.01, 0.01, 0.01, 0.0)))
                boxes = np.zeros((0, 4))
                if self.proposals is not None:
                    fh, fw = images[t].shape[:2]
                    boxes = A.warp_boxes(self.proposals.get(seq.keys[i]) * np.array([fw, fh, fw, fh]), m)
                clip.proposals.append(select_proposals(rng, boxes, s, cfg))
            candidates = candidate_objects(clip.labels[0], cfg.min_pixels)
            if candidates:
                break
        objects = [candidates[j] for j in rng.permutation(len(candidates))]
        return assemble(clip, objects, rng, cfg)
