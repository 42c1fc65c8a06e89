import math

import torch

from corrvos.inference.stcn_memory import STCNMemory




def naive_topk_read(keys, values, query, top_k):
    """Readout by explicit loops: -|k|^2 + 2 k.q over sqrt(C), top-k, softmax, weighted value sum."""
    c, n = keys.shape
    out = torch.zeros(values.shape[0], query.shape[1], dtype=torch.float64)
    for j in range(query.shape[1]):
        sims = [(2 * keys[:, i] @ query[:, j] - keys[:, i] @ keys[:, i]) / math.sqrt(c) for i in range(n)]
        order = sorted(range(n), key=lambda i: -float(sims[i]))[:top_k]
        weights = torch.softmax(torch.stack([sims[i] for i in order]), dim=0)
        for w, i in zip(weights, order):
            out[:, j] += w * values[:, i]
    return out


def test_read_equals_naive_topk_with_a_late_object():
    torch.manual_seed(0)
    ck, cv, h, w = 3, 2, 2, 3
    mem = STCNMemory(top_k=4)
    mem.add_objects(birth=0, count=1)
    keys, vals = [], []
    for frame in (0, 5, 10):
        if frame == 5:
            mem.add_objects(birth=5, count=1)
        k = mem.num_objects
        key = torch.randn(1, ck, h, w, dtype=torch.float64)
        value = torch.randn(1, k, cv, h, w, dtype=torch.float64)
        mem.add(frame, key, value)
        keys.append(key.flatten(2)[0])
        vals.append(value[0].flatten(2))
    query = torch.randn(1, ck, h, w, dtype=torch.float64)
    readout = mem.read(query)
    assert readout.shape == (1, 2, cv, h, w)

    q = query.flatten(2)[0]
    all_keys = torch.cat(keys, dim=1)
    # Object 1 (born at 0) reads all 18 elements; object 2 (born at 5) only frames 5 and 10.
    obj1_values = torch.cat([v[0] for v in vals], dim=1)
    expected1 = naive_topk_read(all_keys, obj1_values, q, top_k=4)
    expected2 = naive_topk_read(torch.cat(keys[1:], dim=1), torch.cat([v[1] for v in vals[1:]], dim=1), q, top_k=4)
    torch.testing.assert_close(readout[0, 0].flatten(1), expected1)
    torch.testing.assert_close(readout[0, 1].flatten(1), expected2)
    # The stored values of object 2 are zero for the frame before its birth.
    assert torch.all(mem.values()[1, :, : h * w] == 0)


def test_cap_drops_oldest_unprotected_frames():
    mem = STCNMemory(top_k=2, max_frames=3)
    mem.add_objects(0, 1)
    for frame in (0, 5, 10, 15, 20):
        mem.add(frame, torch.randn(1, 2, 1, 2), torch.randn(1, 1, 2, 1, 2), protected=frame in (0, 10))
    assert mem.frame_indices == [0, 10, 20]
    assert mem.num_elements == 6
    assert mem.snapshot().keys()[2].tolist() == [0, 0, 10, 10, 20, 20]
    assert mem.values().shape == (1, 2, 6)
