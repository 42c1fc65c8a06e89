"""Losses of correspondence-aware training on tiny hand-made tensors (CPU, well under a second each)."""
import math

import pytest
import torch
import torch.nn.functional as F

from corrvos.training.contrastive import Negatives, contrastive_ce
from corrvos.training.losses import LossConfig, boxes_from_batch, compute_losses, parse_corr, stats_to_floats
from corrvos.training.ocl import assign, match_objects, ocl_loss, sample_queries
from corrvos.training.pcl import jittered_grid, pcl_cross_view, pcl_loss, pcl_temporal, view_points_in_frame
from corrvos.training.schedule import bootstrap_p, correspondence_alpha, max_skip_at
from corrvos.training.seg_losses import bootstrapped_ce, dice_loss


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- schedules

def test_bootstrap_p_schedule():
    assert bootstrap_p(0) == 1.0
    assert bootstrap_p(19_999) == 1.0
    assert bootstrap_p(45_000) == pytest.approx(1 - 0.5 * 0.85)
    assert bootstrap_p(70_000) == pytest.approx(0.15)
    assert bootstrap_p(500_000) == pytest.approx(0.15)
    # Scaled thresholds for short runs: 2K -> 7K.
    assert bootstrap_p(1_999, scale=0.1) == 1.0
    assert bootstrap_p(4_500, scale=0.1) == pytest.approx(0.575)
    assert bootstrap_p(7_000, scale=0.1) == pytest.approx(0.15)
    # final_p 1.0 (train.py --bootstrap-p 1.0): plain CE all the way.
    assert bootstrap_p(500_000, final_p=1.0) == 1.0 and bootstrap_p(45_000, final_p=0.5) == pytest.approx(0.75)


def test_alpha_warmup_schedule():
    assert correspondence_alpha(0, 1000) == 0.0
    assert correspondence_alpha(500, 1000) == pytest.approx(0.1)
    assert correspondence_alpha(1000, 1000) == pytest.approx(0.2)
    assert correspondence_alpha(10**6, 1000) == pytest.approx(0.2)
    assert correspondence_alpha(0, 0) == pytest.approx(0.2)
    assert correspondence_alpha(99, 100, start=100) == 0.0
    assert correspondence_alpha(150, 100, start=100) == pytest.approx(0.1)
    values = [correspondence_alpha(i, 50) for i in range(60)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_max_skip_curriculum():
    args = dict(total_iters=1000, initial=5, values=[10, 15, 5], fractions=[0.1, 0.3, 0.9])
    assert [max_skip_at(i, **args) for i in (0, 99, 100, 299, 300, 899, 900)] == [5, 5, 10, 10, 15, 15, 5]


# ----------------------------------------------------------------------------------------- segmentation

def test_bootstrapped_ce_plain_and_hardest():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    assert torch.allclose(bootstrapped_ce(logits, target, 1.0), F.cross_entropy(logits, target))
    per_pixel = F.cross_entropy(logits, target, reduction="none").flatten(1)
    k = int(64 * 0.25)
    expected = torch.stack([per_pixel[b].sort(descending=True).values[:k].mean() for b in range(2)]).mean()
    assert torch.allclose(bootstrapped_ce(logits, target, 0.25), expected)


def test_selector_equals_channel_slicing():
    # Upstream slices [bg, obj1] when the second object is absent; masking must give the same loss.
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 8, 8)
    target = torch.randint(0, 2, (1, 8, 8))
    selector = torch.tensor([[1.0, 0.0]])
    sliced = F.cross_entropy(logits[:, :2], target)
    assert torch.allclose(bootstrapped_ce(logits, target, 1.0, selector), sliced, atol=1e-6)


def test_dice_perfect_and_wrong():
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[:, :8] = 1
    perfect = torch.full((1, 2, 16, 16), -20.0)
    perfect[:, 0][target == 0] = 20.0
    perfect[:, 1][target == 1] = 20.0
    assert dice_loss(perfect, target) < 0.01
    assert dice_loss(perfect.flip(1), target) > 0.99


# ----------------------------------------------------------------------------------------- PCL

def _distinct_keys(b=2, c=16, h=8, w=8, scale=3.0, seed=0):
    return torch.randn(b, c, h, w, generator=gen(seed)) * scale


def test_jittered_grid_one_point_per_cell():
    ys, xs = jittered_grid(3, 24, 24, 8, gen())
    assert ys.shape == (3, 64)
    cells = (ys // 3) * 8 + xs // 3
    assert all(sorted(c.tolist()) == list(range(64)) for c in cells)
    ys, xs = jittered_grid(1, 4, 6, 8, gen())  # map smaller than the grid: every position once
    assert ys.shape == (1, 24)


def test_pcl_consistent_lower_than_shuffled():
    anchor = _distinct_keys(seed=0)
    key_t = anchor + 0.1 * torch.randn(anchor.shape, generator=gen(1))
    consistent = pcl_temporal(anchor, key_t, key_t.clone(), generator=gen(2))
    perm = torch.randperm(64, generator=gen(3))
    shuffled_t1 = key_t.flatten(2)[:, :, perm].reshape_as(key_t)
    shuffled = pcl_temporal(anchor, key_t, shuffled_t1, generator=gen(2))
    assert consistent < 0.5 * shuffled
    assert consistent < 1.0 and shuffled > 5.0


def test_pcl_gradients_and_pseudo_label_has_none():
    anchor = _distinct_keys(seed=4).requires_grad_()
    key_t = _distinct_keys(seed=5).requires_grad_()
    key_t1 = _distinct_keys(seed=6).requires_grad_()
    pcl_temporal(anchor, key_t, key_t1, generator=gen()).backward()
    assert anchor.grad.abs().sum() > 0 and key_t1.grad.abs().sum() > 0
    assert key_t.grad is None  # the pseudo-label frame gets no gradient (Eq. 6 is an argmax)


def test_pcl_negative_modes():
    anchor, key_t, key_t1 = (_distinct_keys(b=1, seed=s) for s in (7, 8, 9))
    both = pcl_temporal(anchor, key_t, key_t1, negatives="both", generator=gen())
    intra = pcl_temporal(anchor, key_t, key_t1, negatives="intra", generator=gen())
    inter = pcl_temporal(anchor, key_t, key_t1, negatives="inter", generator=gen())
    assert torch.allclose(both, intra)  # one video: no inter-video candidates exist
    assert inter.abs() < 1e-6  # only the positive is left
    anchor2, key_t2, key_t12 = (_distinct_keys(b=3, seed=s) for s in (7, 8, 9))
    losses = {m: pcl_temporal(anchor2, key_t2, key_t12, negatives=m, generator=gen()) for m in Negatives}
    assert losses[Negatives.BOTH] > losses[Negatives.INTRA] and losses[Negatives.BOTH] > losses[Negatives.INTER]


@pytest.mark.parametrize("negatives", list(Negatives))
def test_pcl_pairs_in_one_call_equal_the_mean_of_one_call_per_pair(negatives):
    """XMem-shaped inputs (shrinkage, selection): P stacked pairs give the mean of the P single-pair losses
    and the same gradients; one generator drawn in sequence gives both forms the same grids."""
    b, c, h, w, pairs = 3, 8, 6, 7, 4
    g = gen(11)
    anchor = torch.randn(b, c, h, w, generator=g, dtype=torch.float64).requires_grad_()
    shrink = 1 + torch.rand(b, 1, h, w, generator=g, dtype=torch.float64)
    src, dst = (torch.randn(pairs, b, c, h, w, generator=g, dtype=torch.float64) for _ in range(2))
    sel_src, sel_dst = (torch.rand(pairs, b, c, h, w, generator=g, dtype=torch.float64) for _ in range(2))
    dst.requires_grad_()
    together = pcl_temporal(anchor, src, dst, anchor_shrinkage=shrink, selection_t=sel_src, selection_t1=sel_dst,
                            negatives=negatives, generator=gen(5))
    grads = torch.autograd.grad(together, (anchor, dst))
    one = gen(5)
    apart = torch.stack([pcl_temporal(anchor, src[i], dst[i], anchor_shrinkage=shrink, selection_t=sel_src[i],
                                      selection_t1=sel_dst[i], negatives=negatives, generator=one)
                         for i in range(pairs)]).mean()
    grads_apart = torch.autograd.grad(apart, (anchor, dst))
    assert together.item() == pytest.approx(apart.item(), rel=1e-6)
    for x, y in zip(grads, grads_apart):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-8)


def test_view_points_identity_flip_and_outside():
    ys, xs = torch.tensor([[0, 3]]), torch.tensor([[0, 3]])
    ident = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    coords, inside = view_points_in_frame(ys, xs, 4, 4, ident)
    assert torch.allclose(coords, torch.tensor([[[-0.75, -0.75], [0.75, 0.75]]])) and inside.all()
    flip = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]])
    coords, _ = view_points_in_frame(ys, xs, 4, 4, flip)
    assert torch.allclose(coords[..., 0], torch.tensor([[0.75, -0.75]]))
    shifted = torch.tensor([[[1.0, 0, 2.0], [0, 1.0, 0]]])
    _, inside = view_points_in_frame(ys, xs, 4, 4, shifted)
    assert inside.tolist() == [[False, False]]


def test_cross_view_known_correspondence():
    frame = _distinct_keys(b=2, seed=10)
    # View = horizontally flipped frame: theta maps view x to frame -x.
    flip = torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    right = pcl_cross_view(frame.flip(-1), frame, flip, generator=gen())
    wrong = pcl_cross_view(frame, frame, flip, generator=gen())  # ignores the flip: wrong correspondences
    assert right < 0.1 and wrong > 10 * right


def test_pcl_loss_full_with_view():
    keys = torch.randn(2, 3, 16, 6, 6, generator=gen(11)).requires_grad_()
    view_key = torch.randn(2, 16, 6, 6, generator=gen(12)).requires_grad_()
    ident = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    loss = pcl_loss(keys, view_key=view_key, view_to_frame=ident, view_frame=torch.tensor([0, 2]), generator=gen())
    loss.backward()
    assert math.isfinite(loss.item()) and view_key.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        pcl_loss(keys[:, :2])


# ----------------------------------------------------------------------------------------- OCL

def test_hungarian_recovers_known_permutation():
    torch.manual_seed(0)
    queries = torch.randn(3, 32) * 3
    perm = torch.tensor([4, 0, 2])  # query i sits at candidate perm[i]
    cands = torch.randn(6, 32) * 3  # distractors
    cands[perm] = queries + 0.05 * torch.randn(3, 32)
    assert match_objects(queries, cands).tolist() == perm.tolist()


def test_assignment_equals_scipy_hungarian():
    from scipy.optimize import linear_sum_assignment

    g = gen(7)
    for trial in range(40):
        n, q = 2 + trial % 9, 1 + trial % 3
        sim = torch.randn(1, n, q, generator=g)
        cand_ok = torch.rand(1, n, generator=g) > 0.3
        query_on = torch.rand(1, q, generator=g) > 0.2
        got = assign(sim, cand_ok, query_on)[0]
        cands, queries = torch.nonzero(cand_ok[0]).flatten(), torch.nonzero(query_on[0]).flatten()
        if len(queries) == 0 or len(cands) < len(queries):
            assert (got == -1).all()
            continue
        rows, cols = linear_sum_assignment(sim[0][cands][:, queries].T.numpy(), maximize=True)
        best = sim[0][cands][:, queries].T.numpy()[rows, cols].sum()
        chosen = got[queries]
        assert len(set(chosen.tolist())) == len(queries) and cand_ok[0, chosen].all()
        assert sim[0, chosen, queries].sum().item() == pytest.approx(best, abs=1e-5)
        assert (got[~query_on[0]] == -1).all()


def test_hungarian_is_exclusive():
    # Two queries both closest to candidate 0: the assignment must still give them distinct boxes.
    q = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    c = torch.tensor([[1.0, 0.0], [-5.0, 5.0], [0.0, 1.0]])
    out = match_objects(q, c)
    assert len(set(out.tolist())) == 2


def test_sample_queries_distinct_clusters():
    boxes = torch.tensor([[0, 0, 10, 10], [2, 2, 12, 12], [40, 40, 60, 60], [70, 0, 90, 20], [0, 70, 20, 90.0]])
    ids = torch.tensor([0, 2, 0, 0, 0])
    for seed in range(5):
        q = sample_queries(boxes, ids, 3, 32, gen(seed))
        centres = (boxes[q, :2] + boxes[q, 2:]) / 2
        cells = {tuple((c // 32).long().tolist()) for c in centres}
        assert len(q) == 3 and len(cells) == 3
        if 0 in q.tolist() or 1 in q.tolist():
            assert 1 in q.tolist()  # the annotated box is preferred inside its cluster


def _boxes_scene(seed):
    g = gen(seed)
    xy = torch.rand(12, 2, generator=g) * 40
    wh = 8 + torch.rand(12, 2, generator=g) * 20
    return torch.cat([xy, (xy + wh).clamp(max=64)], dim=1)


def test_ocl_finite_with_one_video():
    key = torch.randn(1, 16, 4, 4, generator=gen(0)).requires_grad_()
    key2 = torch.randn(1, 16, 4, 4, generator=gen(1)).requires_grad_()
    boxes = _boxes_scene(2)
    ids = torch.zeros(12, dtype=torch.long)
    res = ocl_loss(key, key2, [boxes], [ids], [boxes], [ids], (64, 64), generator=gen())
    assert math.isfinite(res.loss.item()) and res.num_queries > 0
    res.loss.backward()
    assert key.grad.abs().sum() > 0
    # Only one box in t': no negative at all -> exact 0, still finite and differentiable.
    res = ocl_loss(key, key2, [boxes], [ids], [boxes[:1]], [ids[:1]], (64, 64), generator=gen())
    assert res.num_queries == 0 and res.loss.item() == 0.0 and res.loss.requires_grad


def test_ocl_bookkeeping_costs_few_torch_ops_per_video():
    """The per-video bookkeeping runs in numpy; only the random draws are torch ops. Each torch op costs
    several microseconds of host time, which bounds the small models' training step on a GPU: the torch
    version dispatched ~90 ops per video of the batch."""
    from experiments.speed import _OpCounter

    def ops(batch):
        key = torch.randn(batch, 16, 8, 8, generator=gen(0)).requires_grad_()
        boxes = [_boxes_scene(s) for s in range(batch)]
        ids = [torch.zeros(len(b), dtype=torch.long) for b in boxes]
        counter = _OpCounter()
        with counter:
            ocl_loss(key, key, boxes, ids, boxes, ids, (64, 64), generator=gen())
        return sum(counter.counts.values())

    assert (ops(8) - ops(2)) / 6 <= 25


def test_ocl_same_frame_lower_than_unrelated():
    key = torch.randn(2, 16, 4, 4, generator=gen(3)) * 3
    other = torch.randn(2, 16, 4, 4, generator=gen(4)) * 3
    boxes = [_boxes_scene(5), _boxes_scene(6)]
    ids = [torch.zeros(12, dtype=torch.long)] * 2
    same = ocl_loss(key, key.clone(), boxes, ids, boxes, ids, (64, 64), negatives="inter", generator=gen())
    diff = ocl_loss(key, other, boxes, ids, boxes, ids, (64, 64), negatives="inter", generator=gen())
    assert same.num_queries == 6 and same.loss < diff.loss


def test_ocl_annotated_identity_overrides_features():
    # Query = annotated object 1; in t' its box has id 1 although another box looks identical.
    key = torch.zeros(1, 4, 4, 4)
    key[0, 0, :2, :2] = 5.0  # feature of the object region
    key2 = key.clone()
    key2[0, 1, 2:, 2:] = 5.0
    box_obj = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    boxes_t2 = torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 64.0, 64.0]])
    res = ocl_loss(key, key2, [box_obj], [torch.tensor([1])], [boxes_t2.flip(0)], [torch.tensor([1, 0])],
                   (64, 64), generator=gen())
    # The id-1 box in t' is the (32..64) region whose features differ: the loss is large.
    assert res.num_queries == 1 and res.loss > 1.0


# ----------------------------------------------------------------------------------------- total

def test_parse_corr():
    assert parse_corr("none") == frozenset()
    assert parse_corr("pcl,ocl") == {"pcl", "ocl"}
    with pytest.raises(ValueError):
        parse_corr("pixel")


def test_compute_losses_alpha_zero_and_terms():
    torch.manual_seed(0)
    b, t, k = 2, 3, 2
    out = {
        "logits": [torch.randn(b, k + 1, 64, 64, requires_grad=True) for _ in range(t - 1)],
        "keys": torch.randn(b, t, 16, 4, 4, requires_grad=True),
        "shrinkage": None, "selection": None,
        "view_key": torch.randn(b, 16, 4, 4, requires_grad=True),
    }
    boxes = torch.stack([torch.stack([_boxes_scene(s * t + f) for f in range(t)]) for s in range(b)])
    object_boxes = torch.full((b, t, 2, 4), -1.0)
    object_boxes[:, :, 0] = torch.tensor([4.0, 4.0, 40.0, 30.0])  # object 7 visible in every frame
    batch = {
        "cls_gt": torch.randint(0, k + 1, (b, t, 64, 64)),
        "selector": torch.ones(b, k),
        "view2_theta": torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(b, 2, 3),
        "boxes": boxes,
        "num_boxes": torch.full((b, t), 12),
        "object_boxes": object_boxes,
        "object_box_ids": torch.tensor([[7, -1]] * b),
    }
    cfg = LossConfig(alpha_warmup=100)
    total0, stats0 = compute_losses(out, batch, cfg, iteration=0, generator=gen())
    stats0 = stats_to_floats(stats0)
    assert stats0["alpha"] == 0.0 and total0.item() == pytest.approx(stats0["ce"], rel=1e-6)
    total, stats = compute_losses(out, batch, cfg, iteration=100, generator=gen())
    stats = stats_to_floats(stats)
    expected = stats["ce"] + 0.2 * (stats["pcl"] + 0.5 * stats["ocl"])
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert out["keys"].grad.abs().sum() > 0 and out["view_key"].grad.abs().sum() > 0
    bx, ids = boxes_from_batch(batch, 1)
    assert [len(x) for x in bx] == [13, 13] and ids[0][-1].item() == 7 and (ids[0][:12] == 0).all()
    seg_only, stats = compute_losses(out, batch, LossConfig(corr=frozenset(), dice=True), 100)
    assert "pcl" not in stats and "ocl" not in stats and "dice" in stats


def test_contrastive_ce_no_valid_query_is_zero():
    sim = torch.randn(1, 4, 3, requires_grad=True)
    loss = contrastive_ce(sim, torch.zeros(1, 3, dtype=torch.long), valid=torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_speed_count_ops_cli(tmp_path, capsys):
    """`python -m experiments.speed --count-ops`: one line and one JSON row per variant, and the
    full method dispatches more ops than L_seg alone (but fewer than twice as many)."""
    import json

    from experiments import speed

    out = tmp_path / "ops.json"
    assert speed.main(["--count-ops", "--models", "stcn-s", "--variants", "seg", "pcl,ocl", "--batch", "2",
                       "--crop", "64", "--device", "cpu", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"seg", "pcl,ocl"}
    assert rows["seg"]["ops"] < rows["pcl,ocl"]["ops"] < 2 * rows["seg"]["ops"]
    assert "vs seg" in capsys.readouterr().out
