import math

import torch

from corrvos.models.similarity import read_memory, similarity, softmax_affinity


def naive_neg_l2(mem, query):
    # -|k_i - q_j|^2 / sqrt(C), element by element
    b, c, n = mem.shape
    m = query.shape[2]
    out = torch.empty(b, n, m, dtype=mem.dtype)
    for bi in range(b):
        for i in range(n):
            for j in range(m):
                out[bi, i, j] = -((mem[bi, :, i] - query[bi, :, j]) ** 2).sum() / math.sqrt(c)
    return out


def test_similarity_equals_neg_l2_up_to_query_norm():
    torch.manual_seed(0)
    mem, query = torch.randn(2, 8, 11, dtype=torch.float64), torch.randn(2, 8, 7, dtype=torch.float64)
    sim = similarity(mem, query)
    full = naive_neg_l2(mem, query)
    # The dropped |q|^2 / sqrt(C) term is constant over the memory axis...
    q_term = (query**2).sum(1, keepdim=True) / math.sqrt(8)
    torch.testing.assert_close(sim - q_term, full)
    # ...so the softmax over memory is the same as with the full distance.
    torch.testing.assert_close(softmax_affinity(sim), torch.softmax(full, dim=1))


def test_anisotropic_similarity_matches_direct_formula():
    torch.manual_seed(1)
    mem, query = torch.randn(1, 4, 5, dtype=torch.float64), torch.randn(1, 4, 3, dtype=torch.float64)
    shrink = 1 + torch.rand(1, 1, 5, dtype=torch.float64) ** 2
    sel = torch.sigmoid(torch.randn(1, 4, 3, dtype=torch.float64))
    sim = similarity(mem, query, mem_shrinkage=shrink, query_selection=sel)
    direct = torch.empty(1, 5, 3, dtype=torch.float64)
    for i in range(5):
        for j in range(3):
            d = (sel[0, :, j] * (mem[0, :, i] - query[0, :, j]) ** 2).sum()
            direct[0, i, j] = -shrink[0, 0, i] * d / 2.0
    torch.testing.assert_close(sim, direct)


def test_topk_keeps_k_weights_per_query_and_normalises():
    torch.manual_seed(2)
    sim = torch.randn(2, 30, 6)
    aff = softmax_affinity(sim, top_k=4)
    assert ((aff > 0).sum(1) == 4).all()
    torch.testing.assert_close(aff.sum(1), torch.ones(2, 6))
    # The surviving weights are the softmax of the 4 largest similarities.
    vals, idx = sim.topk(4, dim=1)
    torch.testing.assert_close(aff.gather(1, idx), torch.softmax(vals, dim=1))
    # Upstream exponentiates without subtracting the max: same weights.
    upstream = vals.exp() / vals.exp().sum(1, keepdim=True)
    torch.testing.assert_close(aff.gather(1, idx), upstream)


def test_read_memory_with_object_axis():
    torch.manual_seed(3)
    aff = softmax_affinity(torch.randn(1, 10, 4))
    values = torch.randn(1, 3, 5, 10)
    out = read_memory(aff, values)
    assert out.shape == (1, 3, 5, 4)
    torch.testing.assert_close(out[0, 1], values[0, 1] @ aff[0])
