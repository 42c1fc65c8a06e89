"""Training data: clip datasets, augmentations, second view, boxes, curriculum, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from corrvos.errors import DatasetError
from corrvos.imageops import IMAGENET_MEAN, IMAGENET_STD
from corrvos.training import augment as A
from corrvos.training.datasets import (ClipConfig, ClipSampler, ConcatClips, SampleKey, StaticClips, VideoClips,
                                       curriculum_max_skip, sample_frames_stcn, sample_frames_xmem, worker_init_fn)
from corrvos.training.proposals import save_proposals
from training_data_helpers import make_layout, object_frames

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnorm(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


@pytest.fixture(scope="module")
def yt_root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("yt"), names=("a", "b"), n=12)


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("davis"), names=("a", "b", "c"), n=12, davis=True)


def check_sample(s: dict, t: int, k: int, size: int, cfg: ClipConfig) -> None:
    assert s["rgb"].shape == (t, 3, size, size) and s["rgb"].dtype == torch.float32
    assert s["masks"].shape == (t, k, size, size) and s["masks"].dtype == torch.float32
    assert s["cls_gt"].shape == (t, size, size) and s["cls_gt"].dtype == torch.int64
    assert s["selector"].shape == (k,) and s["object_ids"].shape == (k,)
    assert s["boxes"].shape == (t, cfg.max_proposals, 4) and s["num_boxes"].shape == (t,)
    assert s["object_boxes"].shape == (t, cfg.max_annotated, 4) and s["object_box_ids"].shape == (cfg.max_annotated,)
    assert s["view2_rgb"].shape == (3, size, size) and s["view2_theta"].shape == (2, 3)
    assert s["frame_indices"].shape == (t,)
    assert set(s["masks"].unique().tolist()) <= {0.0, 1.0}
    n = int(s["num_objects"])
    assert 1 <= n <= k and s["selector"].sum() == n
    assert (s["masks"][:, n:] == 0).all() and (s["object_ids"][n:] == -1).all()
    # cls_gt and masks describe the same objects.
    for j in range(n):
        assert torch.equal(s["cls_gt"] == j + 1, s["masks"][:, j] > 0)
    assert (s["object_box_ids"][:n] == s["object_ids"][:n]).all()
    # Object boxes are the bounding boxes of the augmented masks.
    for ti in range(t):
        for j in range(n):
            ys, xs = torch.nonzero(s["masks"][ti, j], as_tuple=True)
            if len(xs):
                assert s["object_boxes"][ti, j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            else:
                assert (s["object_boxes"][ti, j] == -1).all()


@pytest.mark.parametrize("arch,t,k", [("stcn", 3, 2), ("xmem", 8, 3)])
def test_video_clip_shapes(yt_root, arch, t, k):
    cfg = ClipConfig.preset(arch, crop_size=64)
    data = VideoClips(yt_root, cfg, seed=1)
    assert len(data) == 2
    for i in range(2):
        s = data[SampleKey(i, 0, 10)]
        check_sample(s, t, k, 64, cfg)
        # Only 2 objects exist, so XMem's third slot stays empty.
        assert int(s["num_objects"]) <= 2
        assert (s["object_box_ids"][2:] == -1).all()


def test_youtube_skip_is_divided_by_5(yt_root, davis_root):
    cfg = ClipConfig.preset("stcn", crop_size=64)
    yt, davis = VideoClips(yt_root, cfg), VideoClips(davis_root, cfg)
    assert yt.sequences[0].skip_divisor == 5 and davis.sequences[0].skip_divisor == 1
    yt_gaps, davis_gaps = [], []
    for step in range(40):
        for data, gaps in ((yt, yt_gaps), (davis, davis_gaps)):
            idx = data[SampleKey(0, step, 10)]["frame_indices"].tolist()
            gaps += np.abs(np.diff(idx)).tolist()
    # max_skip 10 -> 10 // 5 = 2 on YouTube-VOS: gaps 1 + rand(0..2).
    assert max(yt_gaps) <= 3 and max(davis_gaps) > 3


def test_frame_samplers():
    rng = np.random.default_rng(0)
    reached = 0
    for _ in range(200):
        n, skip = int(rng.integers(8, 40)), int(rng.integers(1, 12))
        idx = sample_frames_stcn(rng, n, 3, skip)
        assert len(set(idx)) == 3 and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
        assert all(1 <= d <= skip + 1 for d in np.diff(idx))
        idx = sample_frames_xmem(rng, n, 8, skip)
        assert len(set(idx)) == 8 and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
        for i, f in enumerate(idx):
            others = idx[:i] + idx[i + 1:]
            assert min(abs(f - o) for o in others) <= skip
        reached = max(reached, max(np.diff(idx)))
    assert reached > 1  # the sampler does skip frames


def test_skip_curriculum():
    total = 1000
    stcn = [curriculum_max_skip("stcn", it, total) for it in (0, 99, 100, 199, 200, 300, 400, 899, 900, 999)]
    assert stcn == [5, 5, 10, 10, 15, 20, 25, 25, 5, 5]
    xmem = [curriculum_max_skip("xmem", it, total) for it in (0, 100, 299, 300, 899, 900)]
    assert xmem == [5, 10, 10, 15, 15, 5]


def test_set_max_skip_and_epoch(davis_root):
    data = VideoClips(davis_root, ClipConfig.preset("stcn", crop_size=64, second_view=False))
    data.set_max_skip(1)
    gaps = []
    for e in range(20):
        data.set_epoch(e)
        gaps += np.abs(np.diff(data[0]["frame_indices"].tolist())).tolist()
    assert max(gaps) <= 2
    data.set_epoch(0)
    a = data[0]["rgb"]
    data.set_epoch(1)
    assert not torch.equal(a, data[0]["rgb"])


def test_determinism(davis_root):
    cfg = ClipConfig.preset("xmem", crop_size=64)
    a = VideoClips(davis_root, cfg, seed=3)[SampleKey(1, 7, 10)]
    b = VideoClips(davis_root, cfg, seed=3)[SampleKey(1, 7, 10)]
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
    c = VideoClips(davis_root, cfg, seed=4)[SampleKey(1, 7, 10)]
    d = VideoClips(davis_root, cfg, seed=3)[SampleKey(1, 8, 10)]
    assert not torch.equal(a["rgb"], c["rgb"]) and not torch.equal(a["rgb"], d["rgb"])


def test_sampler_keys_resume_and_workers(davis_root):
    full = ClipSampler(10, 4, seed=5, total_steps=6, max_skip_fn=lambda it: 5 + it)
    keys = list(full)
    assert len(keys) == len(full) == 24
    resumed = list(ClipSampler(10, 4, seed=5, start_step=3, total_steps=6, max_skip_fn=lambda it: 5 + it))
    assert resumed == keys[12:]
    first_pass = [k.index for k in keys[:10]]
    assert sorted(first_pass) == list(range(10))  # a permutation per pass over the data
    assert keys[5] == SampleKey(keys[5].index, 1, 6)
    r0 = ClipSampler(10, 2, seed=5, total_steps=3, rank=0, world_size=2).keys(0)
    r1 = ClipSampler(10, 2, seed=5, total_steps=3, rank=1, world_size=2).keys(0)
    assert not {k.index for k in r0} & {k.index for k in r1}

    data = VideoClips(davis_root, ClipConfig.preset("stcn", crop_size=64), seed=2)
    sampler = ClipSampler(len(data), 2, seed=2, total_steps=2)
    serial = [b["rgb"] for b in DataLoader(data, batch_size=2, sampler=sampler)]
    parallel = [b["rgb"] for b in DataLoader(data, batch_size=2, sampler=sampler, num_workers=2,
                                             worker_init_fn=worker_init_fn,
                                             # fork after other tests started threads can deadlock
                                             multiprocessing_context="spawn")]
    assert all(torch.equal(x, y) for x, y in zip(serial, parallel))


def test_concat_repeats(yt_root, davis_root):
    cfg = ClipConfig.preset("stcn", crop_size=64)
    cat = ConcatClips([VideoClips(davis_root, cfg), VideoClips(yt_root, cfg)], repeats=[2, 1], seed=9)
    assert len(cat) == 3 * 2 + 2
    names = [cat[SampleKey(i, 0, 5)]["name"] for i in range(len(cat))]
    assert names == ["a", "b", "c", "a", "b", "c", "a", "b"]
    # The two repeats of one sequence draw different clips.
    assert not torch.equal(cat[SampleKey(0, 0, 5)]["rgb"], cat[SampleKey(3, 0, 5)]["rgb"])
    cat.set_max_skip(7)
    assert all(d.max_skip == 7 for d in cat.datasets)


def _alignment_error(rgb: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of pixels away from object edges where "bright" and "in mask" disagree.

    The synthetic object is white (255) on a dark background (< 40) and the fill colour is the
    ImageNet mean (~115): after colour jitter / greyscale, bright (> 0.6) means object.
    """
    lum = unnorm(rgb).mean(0)
    bright = (lum > 0.6).float()
    m = mask.float()[None, None]
    # Skip a 1-pixel band around mask edges (interpolation of the image vs nearest of the mask).
    dil = F.max_pool2d(m, 3, 1, 1)[0, 0]
    ero = -F.max_pool2d(-m, 3, 1, 1)[0, 0]
    interior = (dil == ero)
    return float(((bright != mask.float()) & interior).float().sum() / interior.sum())


def test_masks_stay_aligned_with_images(davis_root):
    cfg = ClipConfig.preset("xmem", crop_size=96)
    data = VideoClips(davis_root, cfg, seed=0)
    covered = 0
    for step in range(4):
        s = data[SampleKey(step % 3, step, 10)]
        union = s["masks"].amax(1)
        for t in range(cfg.num_frames):
            assert _alignment_error(s["rgb"][t], union[t]) < 0.005
            covered += int(union[t].sum())
    assert covered > 0


def test_static_clips_aligned_with_tps(tmp_path):
    frames, labels = object_frames(3, 90, 130, objects=1)
    items = [(f, lab) for f, lab in zip(frames, labels)]
    cfg = ClipConfig(crop_size=96, max_objects=1, tps_p=1.0)
    data = StaticClips(items, cfg, seed=1)
    for i in range(3):
        s = data[SampleKey(i, 0)]
        check_sample(s, 3, 1, 96, cfg)
        for t in range(3):
            assert _alignment_error(s["rgb"][t], s["masks"][t, 0]) < 0.002


def test_tps_warp_keeps_alignment():
    rng = np.random.default_rng(0)
    size = (80, 100)
    img = np.zeros((*size, 3), np.uint8)
    lab = np.zeros(size, np.uint8)
    img[20:60, 30:70] = 255
    lab[20:60, 30:70] = 1
    moved = 0
    for _ in range(5):
        tps = A.random_tps(rng, size)  # upstream sigma 0.02: displacements of a few pixels
        wi, wl = tps.image(img, "bilinear", fill=(0, 0, 0)), tps.labels(lab)
        bright = wi.mean(2) > 127
        edge = np.abs(np.diff(wl.astype(int), axis=0, prepend=0)).astype(bool) | np.abs(np.diff(wl.astype(int), axis=1, prepend=0)).astype(bool)
        edge = edge | np.roll(edge, 1, 0) | np.roll(edge, -1, 0) | np.roll(edge, 1, 1) | np.roll(edge, -1, 1)
        assert ((bright != wl.astype(bool)) & ~edge).mean() < 0.002
        moved += int((wl != lab).sum())
        # Boxes follow the warp (to about a pixel).
        box = tps.boxes(np.array([[30.0, 20.0, 70.0, 60.0]]))[0]
        ys, xs = np.nonzero(wl)
        assert np.abs(box - [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).max() < 2
    assert moved > 0  # the warp is not the identity


def test_second_view_theta_reproduces_view2():
    yy, xx = np.mgrid[0:128, 0:128]
    smooth = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 11.0), (xx + yy)], -1).clip(0, 255).astype(np.uint8)
    frames = [smooth] * 3
    labels = [np.pad(np.ones((40, 40), np.uint8), 44)] * 3
    cfg = ClipConfig(crop_size=96, max_objects=1, tps_p=0.0)
    data = StaticClips(list(zip(frames, labels)), cfg, seed=0)
    flips = 0
    for step in range(6):
        s = data[SampleKey(0, step)]
        theta = s["view2_theta"][None]
        grid = F.affine_grid(theta, (1, 3, 96, 96), align_corners=False)
        warped = F.grid_sample(unnorm(s["rgb"][0])[None], grid, mode="bilinear", align_corners=False)[0]
        err = (warped - unnorm(s["view2_rgb"])).abs()[:, 2:-2, 2:-2].mean()
        assert err < 0.02, err
        # The inverse maps view 2 back onto view 1 inside the region view 2 covers.
        back = F.grid_sample(unnorm(s["view2_rgb"])[None], F.affine_grid(s["view2_theta_inv"][None], (1, 3, 96, 96),
                                                                          align_corners=False), align_corners=False)[0]
        inside = (F.grid_sample(torch.ones(1, 1, 96, 96), F.affine_grid(s["view2_theta_inv"][None], (1, 1, 96, 96),
                                                                         align_corners=False), align_corners=False)[0, 0] > 0.999)
        assert inside.sum() > 0.2 * 96 * 96
        assert ((back - unnorm(s["rgb"][0])).abs().mean(0)[inside]).mean() < 0.03
        flips += int(s["view2_theta"][0, 0] < 0)
    assert 0 < flips < 6


def test_grid_theta_exact_on_a_flip():
    g = A.hflip(64)
    theta = A.grid_theta(g, (64, 64))
    assert np.allclose(theta, [[-1, 0, 0], [0, 1, 0]])
    g = A.resized_crop(16, 16, 32, 32, 64, 64)  # centre zoom x2
    assert np.allclose(A.grid_theta(g, (64, 64)), [[0.5, 0, 0], [0, 0.5, 0]])


def test_box_transforms():
    boxes = np.array([[10.0, 20.0, 30.0, 50.0]])
    assert np.allclose(A.warp_boxes(boxes, A.hflip(100)), [[70, 20, 90, 50]])
    crop = A.resized_crop(10, 10, 50, 50, 100, 100)  # x2 zoom of the window at (10, 10)
    assert np.allclose(A.warp_boxes(boxes, crop), [[0, 20, 40, 80]])
    rot = A.affine_about(0, 0, angle=90)
    assert np.allclose(A.warp_boxes(np.array([[0.0, 0.0, 2.0, 1.0]]), rot), [[-1, 0, 0, 2]])
    clipped, keep = A.clip_boxes(np.array([[-10.0, 0, 50, 50], [95, 0, 130, 40], [0, 0, 100, 3], [10, 10, 20, 20]]),
                                 (100, 100), min_side=5)
    assert keep.tolist() == [True, False, False, True]
    assert np.allclose(clipped[0], [0, 0, 50, 50])
    lab = np.zeros((10, 12), np.uint8)
    lab[2:5, 3:9] = 4
    assert A.boxes_from_labels(lab, [4, 7]).tolist() == [[3, 2, 9, 5], [-1, -1, -1, -1]]


def test_proposals_follow_the_augmentation(tmp_path):
    root = make_layout(tmp_path / "d", names=("a",), n=6, objects=1, davis=True)
    frames, labels = object_frames(6, 72, 112, seed=0, objects=1)
    cache = {}
    for t, lab in enumerate(labels):
        ys, xs = np.nonzero(lab)
        # Proposal 0 = the object's own box; proposal 1 = a large box around the centre.
        cache[f"a/{t:05d}"] = np.array([[xs.min() / 112, ys.min() / 72, (xs.max() + 1) / 112, (ys.max() + 1) / 72],
                                        [0.2, 0.2, 0.8, 0.8]])
    save_proposals(tmp_path / "p.npz", cache, {"size": 240})
    cfg = ClipConfig.preset("stcn", crop_size=64, frame_degrees=0, frame_shear=0)
    data = VideoClips(root, cfg, proposals=tmp_path / "p.npz")
    checked = 0
    for step in range(10):
        s = data[SampleKey(0, step, 3)]
        for t in range(3):
            nb = int(s["num_boxes"][t])
            assert (s["boxes"][t, nb:] == -1).all()
            obj = s["object_boxes"][t, 0]
            if obj[0] < 0 or nb == 0 or obj[0] <= 0 or obj[1] <= 0 or obj[2] >= 64 or obj[3] >= 64:
                continue  # clipped by the crop: the mask box and the clipped proposal legitimately differ
            best = (s["boxes"][t, :nb] - obj).abs().max(1).values.min()
            assert best < 1.5
            checked += 1
    assert checked > 5


def test_davis2016_two_sequences(davis2016_root, tmp_path):
    seqs = ["dog-agility", "rollerblade"]
    for arch, t in (("stcn", 3), ("xmem", 8)):
        cfg = ClipConfig.preset(arch, crop_size=64)
        data = VideoClips(davis2016_root, cfg, sequences=seqs, cache_dir=tmp_path)
        assert [s.name for s in data.sequences] == seqs
        assert [len(s.frames) for s in data.sequences] == [25, 35]
        found = 0
        for i in range(2):
            s = data[SampleKey(i, 0, 5)]
            assert s["rgb"].shape == (t, 3, 64, 64) and s["name"] == seqs[i]
            assert s["frame_indices"].max() < len(data.sequences[i].frames)
            found += int(s["num_objects"])
            assert set(s["object_ids"].tolist()) <= {1, -1}
        assert found >= 1
    static = StaticClips.from_video_layout(davis2016_root, sequences=seqs, every=10, cache_dir=tmp_path,
                                           config=ClipConfig(crop_size=64, max_objects=1))
    assert len(static) == 3 + 4
    s = static[SampleKey(0, 0)]
    assert s["name"] == "dog-agility/00000" and s["rgb"].shape == (3, 3, 64, 64)


def test_static_from_folder_and_errors(tmp_path):
    import cv2

    frames, labels = object_frames(2, 60, 80, objects=1)
    for i, (f, lab) in enumerate(zip(frames, labels)):
        cv2.imwrite(str(tmp_path / f"img{i}.jpg"), f[:, :, ::-1])
        cv2.imwrite(str(tmp_path / f"img{i}.png"), lab * 255)
    data = StaticClips.from_folder(tmp_path, config=ClipConfig(crop_size=64, max_objects=1))
    assert len(data) == 2
    s = data[0]
    assert s["masks"].shape == (3, 1, 64, 64) and int(s["num_objects"]) == 1
    with pytest.raises(DatasetError):
        StaticClips.from_folder(tmp_path / "missing")
    with pytest.raises(DatasetError):
        VideoClips(tmp_path)
    with pytest.raises(DatasetError):
        VideoClips(make_layout(tmp_path / "v", names=("a",), n=4), ClipConfig.preset("xmem", crop_size=64))
