"""Training datasets of corrvos: the sample format, and the public names of the data side.

    from corrvos.training.datasets import ClipConfig, VideoClips, StaticClips, ClipSampler
    cfg = ClipConfig.preset("stcn")                       # or "xmem"; crop_size=..., etc.
    data = VideoClips("/data/DAVIS2017", cfg, proposals="davis_proposals.npz")
    loader = DataLoader(data, batch_size=4, num_workers=4, worker_init_fn=worker_init_fn,
                        sampler=ClipSampler(len(data), 4, seed, start_step, total_steps,
                                            max_skip_fn=lambda it: curriculum_max_skip("stcn", it, total_steps)))

Sample dict (one item; the DataLoader's default collate adds a leading batch dim B to tensors and
turns ``name`` into a list). T = ``num_frames`` (3 STCN, 8 XMem), S = ``crop_size`` (384),
K = ``max_objects`` (2 STCN, 3 XMem; 1 for static clips), N = ``max_proposals`` (64),
M = ``max_annotated`` (8). Boxes are ``(x1, y1, x2, y2)`` float in crop pixel *edge* coordinates:
a box covering the whole crop is ``(0, 0, S, S)``; padding rows are all ``-1``.

    rgb              float32 (T, 3, S, S)  ImageNet-normalised frames (corrvos.imageops.normalize)
    masks            float32 (T, K, S, S)  {0, 1}; channel k = k-th selected object (zeros if unused)
    cls_gt           int64   (T, S, S)     0 = background (incl. objects not selected), k + 1 = object k
    selector         float32 (K,)          1 for used object slots, 0 for padding
    num_objects      int64   ()            number of used slots (0 when no object was big enough, see below)
    object_ids       int64   (K,)          dataset label id of each slot, -1 for padding
    boxes            float32 (T, N, 4)     Selective Search proposals of each frame, moved by the frame's
                                           geometric augmentation (enclosing box of the moved corners,
                                           clipped to the crop; boxes with a side < min_box_fraction * S or
                                           with < 25 % of their area inside are dropped; random subset of N)
    num_boxes        int64   (T,)          valid rows of ``boxes`` (all padding without a proposal cache)
    object_boxes     float32 (T, M, 4)     bounding boxes of annotated objects from the augmented masks;
                                           row m is the same object in every frame, -1 where it is absent;
                                           rows 0..num_objects-1 are the selected objects (slot order)
    object_box_ids   int64   (M,)          dataset label id of each ``object_boxes`` row, -1 for padding;
                                           equal ids in one clip = same instance (the OCL's known identity)
    frame_indices    int64   (T,)          frame numbers in the sequence, in clip order (0s for static clips)
    name             str                   sequence name (static: the frame key or item index)
    index, step      int                   the item index and the step of the SampleKey it was drawn with
    view2_rgb        float32 (3, S, S)     (if config.second_view) PCL's cross-view anchor: frame 0 of view 1
                                           cropped (square, side 0.5-1.0 of S) + flipped (p = 0.5), resized to S,
                                           same colour as rgb[0]
    view2_theta      float32 (2, 3)        view-2 -> view-1 map in normalised coordinates (align_corners=False):
                                           grid_sample(v1, affine_grid(view2_theta, v2.shape, align_corners=False),
                                           align_corners=False) resamples any view-1 tensor (image, features,
                                           masks) into view-2 geometry; always in bounds (view 2 is inside view 1)
    view2_theta_inv  float32 (2, 3)        the inverse map (view-1 -> view-2), to pull view-2 tensors into view-1
                                           geometry (out-of-crop regions then sample zeros)

Object choice: the objects present in frame 0 of the augmented clip with at least
``config.min_pixels`` pixels are shuffled and the first K are used. When none is, the clip is
redrawn (up to ``max_trials``); if still none, the sample has ``num_objects == 0`` (all-zero masks
and selector), as upstream, and the loss must skip it.

Frame order: reversed with p = 0.5 (video). Max skip: ``set_max_skip`` or ``SampleKey.max_skip``;
YouTube-VOS divides it by 5. Curricula: ``curriculum_max_skip("stcn" | "xmem", it, total)``.
"""
from __future__ import annotations

from corrvos.training.framestore import FrameStore
from corrvos.training.layouts import VideoSequence, find_sequences, unpack_compact
from corrvos.training.proposals import ProposalCache, load_proposals
from corrvos.training.samples import (SKIP_CURRICULUM, ClipConfig, ClipDataset, ClipSampler, ConcatClips, SampleKey,
                                      curriculum_max_skip, sample_rng, worker_init_fn)
from corrvos.training.static_dataset import StaticClips
from corrvos.training.video_dataset import VideoClips, sample_frames_stcn, sample_frames_xmem

__all__ = [
    "SKIP_CURRICULUM", "ClipConfig", "ClipDataset", "ClipSampler", "ConcatClips", "FrameStore", "ProposalCache",
    "SampleKey",
    "StaticClips", "VideoClips", "VideoSequence", "curriculum_max_skip", "find_sequences", "load_proposals",
    "sample_frames_stcn", "sample_frames_xmem", "sample_rng", "unpack_compact", "worker_init_fn",
]
