"""XMem memory manager: consolidation, usage and the long-term cap, checked against explicit loops."""
import math

import pytest
import torch

from corrvos.inference.xmem_memory import XMemMemory, _LongTermMemory



CK, CV, H, W = 3, 2, 2, 2
HW = H * W


def aniso_sim(mem_key, mem_shrink, q_key, q_sel):
    """S = -s_i * sum_c e_c (k_ic - q_c)^2 / sqrt(C), one pair at a time."""
    return -mem_shrink * float((q_sel * (mem_key - q_key) ** 2).sum()) / math.sqrt(CK)


def naive_read(keys, shrink, values, q_keys, q_sels, top_k):
    """Explicit top-k read; returns readout (Cv, M) and per-element usage (sum of weights over queries)."""
    n = keys.shape[1]
    usage = torch.zeros(n, dtype=torch.float64)
    out = torch.zeros(values.shape[0], q_keys.shape[1], dtype=torch.float64)
    for j in range(q_keys.shape[1]):
        sims = torch.tensor([aniso_sim(keys[:, i], shrink[i], q_keys[:, j], q_sels[:, j]) for i in range(n)])
        order = sorted(range(n), key=lambda i: -float(sims[i]))[: min(top_k, n)]
        weights = torch.softmax(sims[order], dim=0)
        for wt, i in zip(weights, order):
            out[:, j] += wt * values[:, i]
            usage[i] += wt
    return out, usage


class Recorder:
    """Feeds the memory and keeps a plain copy of everything (keys, values, usage) for the naive model."""

    def __init__(self, mem):
        self.mem = mem
        self.keys, self.shrink, self.sel, self.values, self.frames = [], [], [], [], []
        self.use, self.life = [], []

    def add(self, frame, permanent=False):
        k = self.mem.num_objects
        key = torch.randn(1, CK, H, W, dtype=torch.float64)
        shrink = 1 + torch.rand(1, 1, H, W, dtype=torch.float64)
        sel = torch.sigmoid(torch.randn(1, CK, H, W, dtype=torch.float64))
        value = torch.randn(1, k, CV, H, W, dtype=torch.float64)
        self.mem.add(frame, key, shrink, value, sel, permanent=permanent)
        self.keys.append(key.flatten(2)[0])
        self.shrink.append(shrink.flatten())
        self.sel.append(sel.flatten(2)[0])
        self.values.append(value[0].flatten(2))
        self.frames += [frame] * HW
        self.use += [0.0] * HW
        self.life += [1e-7] * HW

    def read(self):
        q = torch.randn(1, CK, H, W, dtype=torch.float64)
        e = torch.sigmoid(torch.randn(1, CK, H, W, dtype=torch.float64))
        readout = self.mem.read(q, e)
        # Before any consolidation every WM element is visible to object 1: count usage naively.
        _, usage = naive_read(
            torch.cat(self.keys, 1), torch.cat(self.shrink), torch.cat([v[0] for v in self.values], 1),
            q.flatten(2)[0], e.flatten(2)[0], self.mem.top_k,
        )
        self.use = [u + float(x) for u, x in zip(self.use, usage)]
        self.life = [x + 1 for x in self.life]
        return readout


def test_consolidation_gives_expected_prototypes():
    torch.manual_seed(3)
    mem = XMemMemory(top_k=3, min_working_frames=2, max_working_frames=4, num_prototypes=3, max_long_term_elements=100)
    rec = Recorder(mem)
    like = torch.zeros(1, CK, H, W, dtype=torch.float64)
    mem.add_objects(0, 1, like)
    rec.add(0)
    rec.read()
    rec.add(5)
    rec.read()
    rec.read()
    mem.add_objects(10, 1, like)  # a second object appears at frame 10
    rec.add(10)
    rec.read()
    assert mem.long_term_elements == 0
    rec.add(15)  # WM reaches max_working_frames = 4: consolidate

    # Candidates: frames between the first and the newest min_working_frames - 1 = 1, i.e. frames 5 and 10.
    cand = list(range(HW, 3 * HW))
    usage = torch.tensor([rec.use[i] / rec.life[i] for i in cand])
    chosen = [cand[i] for i in torch.topk(usage, 3).indices.tolist()]
    keys, shrink, sel = torch.cat(rec.keys, 1), torch.cat(rec.shrink), torch.cat(rec.sel, 1)
    # Per-object values over all elements; object 2 has none before it appeared.
    values = [
        torch.cat([v[o] if o < v.shape[0] else torch.zeros(CV, HW, dtype=torch.float64) for v in rec.values], 1)
        for o in range(2)
    ]

    exp_shrink, exp_values = [], torch.zeros(2, CV, 3, dtype=torch.float64)
    for p, proto in enumerate(chosen):
        sims = torch.tensor([aniso_sim(keys[:, i], shrink[i], keys[:, proto], sel[:, proto]) for i in cand])
        weights = torch.softmax(sims, 0)
        exp_shrink.append(float((weights * shrink[cand]).sum()))
        exp_values[0, :, p] = values[0][:, cand] @ weights
        if rec.frames[proto] >= 10:  # object 2 only exists from frame 10: softmax over its candidates only
            late = [i for i in cand if rec.frames[i] >= 10]
            sims2 = torch.tensor([aniso_sim(keys[:, i], shrink[i], keys[:, proto], sel[:, proto]) for i in late])
            exp_values[1, :, p] = values[1][:, late] @ torch.softmax(sims2, 0)

    lt = mem.long_term
    assert mem.consolidations == 1
    torch.testing.assert_close(lt.key[0], keys[:, chosen])
    torch.testing.assert_close(lt.shrinkage.flatten(), torch.tensor(exp_shrink, dtype=torch.float64))
    torch.testing.assert_close(lt.value, exp_values)
    assert lt.frames.tolist() == [rec.frames[i] for i in chosen]
    assert lt.positions.tolist() == [i % HW for i in chosen]
    assert mem.working_frame_indices == [0, 15]
    assert mem.working_elements == 2 * HW

    # The next read uses [LT, WM] with per-object visibility; check it against explicit loops.
    q = torch.randn(1, CK, H, W, dtype=torch.float64)
    e = torch.sigmoid(torch.randn(1, CK, H, W, dtype=torch.float64))
    readout = mem.read(q, e)
    wm = list(range(HW)) + list(range(3 * HW, 4 * HW))
    all_keys = torch.cat([lt.key[0], keys[:, wm]], 1)
    all_shrink = torch.cat([lt.shrinkage.flatten(), shrink[wm]])
    obj1 = torch.cat([exp_values[0], values[0][:, wm]], 1)
    expected1, _ = naive_read(all_keys, all_shrink, obj1, q.flatten(2)[0], e.flatten(2)[0], 3)
    torch.testing.assert_close(readout[0, 0].flatten(1), expected1)
    visible = [i for i, f in enumerate(lt.frames.tolist() + [0] * HW + [15] * HW) if f >= 10]
    obj2 = torch.cat([exp_values[1], values[1][:, wm]], 1)
    expected2, _ = naive_read(all_keys[:, visible], all_shrink[visible], obj2[:, visible], q.flatten(2)[0], e.flatten(2)[0], 3)
    torch.testing.assert_close(readout[0, 1].flatten(1), expected2)


def test_permanent_frames_are_never_consolidated():
    torch.manual_seed(4)
    mem = XMemMemory(top_k=3, min_working_frames=2, max_working_frames=4, num_prototypes=3, max_long_term_elements=100)
    rec = Recorder(mem)
    mem.add_objects(0, 1, torch.zeros(1, CK, H, W, dtype=torch.float64))
    rec.add(0)
    rec.read()
    rec.add(5, permanent=True)  # e.g. a corrected frame
    rec.read()
    rec.add(10)
    rec.read()
    rec.read()
    rec.add(15)  # WM full: of the candidates 5 and 10 only 10 may leave
    assert mem.consolidations == 1 and mem.working_frame_indices == [0, 5, 15]
    cand = list(range(2 * HW, 3 * HW))
    usage = torch.tensor([rec.use[i] / rec.life[i] for i in cand])
    chosen = [cand[i] for i in torch.topk(usage, 3).indices.tolist()]
    assert mem.long_term.frames.tolist() == [10, 10, 10]
    torch.testing.assert_close(mem.long_term.key[0], torch.cat(rec.keys, 1)[:, chosen])
    # The rows that stayed keep their values and usage: the next read equals the explicit one over [LT, WM].
    values = torch.cat([v[0] for v in rec.values], 1)
    wm = list(range(0, 2 * HW)) + list(range(3 * HW, 4 * HW))
    q = torch.randn(1, CK, H, W, dtype=torch.float64)
    e = torch.sigmoid(torch.randn(1, CK, H, W, dtype=torch.float64))
    readout = mem.read(q, e)
    lt = mem.long_term
    keys, shrink = torch.cat(rec.keys, 1), torch.cat(rec.shrink)
    expected, _ = naive_read(torch.cat([lt.key[0], keys[:, wm]], 1), torch.cat([lt.shrinkage.flatten(), shrink[wm]]),
                             torch.cat([lt.value[0], values[:, wm]], 1), q.flatten(2)[0], e.flatten(2)[0], 3)
    torch.testing.assert_close(readout[0, 0].flatten(1), expected)
    rec.add(20)  # full again: only 15 is a candidate now; 5 stays for good
    assert mem.consolidations == 2 and mem.working_frame_indices == [0, 5, 20]
    rec.add(25)
    assert mem.consolidations == 3 and mem.working_frame_indices == [0, 5, 25]
    assert sorted(set(mem.long_term.frames.tolist())) == [10, 15, 20]


def test_long_term_cap_removes_least_used_including_ties():
    lt = _LongTermMemory()
    n = 8
    lt.add(
        torch.arange(n, dtype=torch.float32).view(1, 1, n),
        torch.ones(1, 1, n),
        torch.arange(n, dtype=torch.float32).view(1, 1, n),
        torch.arange(n),
        torch.zeros(n, dtype=torch.long),
    )
    lt.use_count = torch.tensor([5.0, 1.0, 3.0, 2.0, 2.0, 9.0, 0.5, 7.0])
    lt.life_count = torch.ones(n)
    # Keep 5 of 8: the 3 lowest usages are 0.5, 1 and 2; the other element at 2 is a tie and goes too.
    lt.remove_least_used(5)
    assert lt.frames.tolist() == [0, 2, 5, 7]
    assert lt.key.flatten().tolist() == [0.0, 2.0, 5.0, 7.0]
    assert lt.value.flatten().tolist() == [0.0, 2.0, 5.0, 7.0]
    assert lt.use_count.tolist() == [5.0, 3.0, 9.0, 7.0]
    lt.remove_least_used(10)  # already small enough: nothing happens
    assert lt.size == 4


def test_options_are_validated():
    with pytest.raises(ValueError):
        XMemMemory(min_working_frames=5, max_working_frames=5)
    with pytest.raises(ValueError):
        XMemMemory(num_prototypes=10, max_long_term_elements=10)
