"""The fast inference paths against the dense reference path.

* similarity: the query-major layout and the reusable workspace give the very same numbers.
* sparse read: ``topk_affinity`` + ``read_topk`` give the weights of ``softmax_affinity`` (1e-6) and
  the readout of ``read_memory`` (1e-5).
* whole tracker: stcn-s / xmem-s (random weights, tiny memory settings so that XMem consolidates and
  trims its long-term memory, an object added later) give the same fp32 probabilities as a tracker
  whose memory reads are the dense oracle below (1e-5), and ``matches`` still explains the read.
* the memory buffers grow geometrically and stay equal to what was stored.
* bf16 / fp16 trackers: the network runs under autocast, the memory stays fp32, labels agree with fp32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import corrvos
from corrvos.inference.memory_common import ElementBuffer, birth_groups, valid_index
from corrvos.inference.stcn_memory import STCNMemory
from corrvos.inference.tracker import Tracker
from corrvos.inference.xmem_memory import XMemMemory
from corrvos.models.similarity import (
    TopKAffinity,
    Workspace,
    read_memory,
    read_topk,
    similarity,
    softmax_affinity,
    topk_affinity,
)
from fake_vos_net import FakeVOSNet, moving_squares


def _keys(seed: int, c: int = 16, n: int = 300, m: int = 70, selection: bool = False):
    g = torch.Generator().manual_seed(seed)
    mem, query = torch.randn(1, c, n, generator=g), torch.randn(1, c, m, generator=g)
    shrink = 1 + torch.rand(1, 1, n, generator=g) if selection else None
    sel = torch.sigmoid(torch.randn(1, c, m, generator=g)) if selection else None
    return mem, query, shrink, sel


@pytest.mark.parametrize("selection", [False, True], ids=["stcn", "xmem"])
def test_query_major_similarity_and_workspace_give_the_same_numbers(selection):
    mem, query, shrink, sel = _keys(0, selection=selection)
    dense = similarity(mem, query, shrink, sel)  # (1, N, M)
    qm = similarity(mem, query, shrink, sel, query_major=True)  # (1, M, N)
    assert qm.shape == (1, 70, 300) and qm.is_contiguous()
    torch.testing.assert_close(qm, dense.transpose(1, 2), rtol=0, atol=1e-5)
    ws = Workspace()
    with torch.inference_mode():
        first = similarity(mem, query, shrink, sel, query_major=True, workspace=ws).clone()
        again = similarity(mem, query, shrink, sel, query_major=True, workspace=ws)
    assert torch.equal(first, qm) and torch.equal(again, qm)
    # A strided view of a larger buffer (how the memory keeps its keys) changes nothing.
    wide = torch.zeros(1, mem.shape[1], 512)
    wide[:, :, :300] = mem
    wide_shrink = None
    if shrink is not None:
        wide_shrink = torch.zeros(1, 1, 512)
        wide_shrink[:, :, :300] = shrink
        wide_shrink = wide_shrink[:, :, :300]
    assert torch.equal(similarity(wide[:, :, :300], query, wide_shrink, sel, query_major=True), qm)
    # With autograd the same expression is evaluated out of place, and gradients flow.
    mem_g = mem.clone().requires_grad_()
    with_grad = similarity(mem_g, query, shrink, sel)
    assert torch.equal(with_grad.detach(), dense)
    with_grad.sum().backward()
    assert mem_g.grad is not None and torch.isfinite(mem_g.grad).all()


@pytest.mark.parametrize("top_k", [None, 1, 7, 300, 500])
def test_sparse_topk_read_equals_dense_softmax_and_read(top_k):
    mem, query, _, _ = _keys(1)
    sim = similarity(mem, query)
    values = torch.randn(1, 2 * 5, 300)  # two objects x 5 channels, (B, D, N)
    dense = softmax_affinity(sim, top_k)
    sparse = topk_affinity(similarity(mem, query, query_major=True), top_k)
    if top_k is not None and top_k < 300:
        assert sparse.weights.shape == (1, 70, top_k) and sparse.indices.shape == (1, 70, top_k)
    else:
        assert sparse.indices is None
    torch.testing.assert_close(sparse.dense(300), dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(sparse.element_sums(300), dense.sum(2), rtol=0, atol=1e-5)
    expected = read_memory(dense, values)  # (1, D, M)
    got = read_topk(sparse, values.transpose(1, 2).contiguous())  # (1, M, D)
    torch.testing.assert_close(got.transpose(1, 2), expected, rtol=0, atol=1e-5)
    with torch.inference_mode():
        ws = Workspace()
        again = read_topk(sparse, values.transpose(1, 2).contiguous(), ws)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_sparse_read_batched_and_remapped_to_a_subset():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(3, 40, 25, generator=g)  # (B, N, M)
    values = torch.randn(3, 6, 40, generator=g)
    sparse = topk_affinity(sim.transpose(1, 2).contiguous(), 4)
    got = read_topk(sparse, values.transpose(1, 2).contiguous()).transpose(1, 2)
    torch.testing.assert_close(got, read_memory(softmax_affinity(sim, 4), values), rtol=0, atol=1e-5)
    # Weights over a subset of elements, put back on all of them: zeros outside the subset.
    index = torch.tensor([1, 5, 6, 20, 33, 39])
    sub = topk_affinity(sim[:1].index_select(1, index).transpose(1, 2).contiguous(), 3).remap(index, 40)
    expected = torch.zeros(1, 40, 25)
    expected[:, index] = softmax_affinity(sim[:1].index_select(1, index), 3)
    torch.testing.assert_close(sub.dense(40), expected, rtol=0, atol=1e-6)


# --- the whole tracker against a dense oracle ------------------------------------------------------
def _dense_reference_read(memory, query_key, query_selection):
    """Dense oracle of a memory read: concatenated snapshot keys, (N, M) similarity, one dense top-k
    softmax per birth group (``softmax_affinity``), ``read_memory`` over the (K, Cv, N) values."""
    h, w = query_key.shape[-2:]
    key, shrinkage, frames, _ = memory.snapshot().keys()
    sel = None if query_selection is None else query_selection.flatten(2)
    if isinstance(memory, STCNMemory):
        shrinkage = sel = None
    sim = similarity(key, query_key.flatten(2), shrinkage, sel)
    values = memory.values()  # (K, Cv, N)
    parts, full = [], None
    for birth, first, end in birth_groups(memory.births):
        index = valid_index(frames, birth, sim.device)
        group_sim = sim if index is None else sim.index_select(1, index)
        affinity = softmax_affinity(group_sim, memory.top_k)
        group_values = values[first:end] if index is None else values[first:end].index_select(2, index)
        parts.append(read_memory(affinity, group_values.unsqueeze(0)))
        if index is None:
            full = affinity
    if isinstance(memory, XMemMemory) and memory.enable_long_term:
        memory._count_usage(TopKAffinity(full.transpose(1, 2), None), full.shape[1])
    readout = torch.cat(parts, dim=1)
    return readout.reshape(1, readout.shape[1], readout.shape[2], h, w)


SMALL = {
    "stcn-s": dict(mem_every=2, max_memory_frames=4),
    "xmem-s": dict(mem_every=2, min_working_frames=2, max_working_frames=4, num_prototypes=8,
                   max_long_term_elements=20),
}


@pytest.fixture(scope="module")
def clip():
    frames, labels = moving_squares(16, height=64, width=80, square=20, late_object_at=5)
    masks = {0: np.where(labels[0] == 3, 0, labels[0]), 5: np.where(labels[5] == 3, 3, 0).astype(np.uint8)}
    return frames, masks


def _run(tracker, frames, masks):
    return [tracker.step(f, masks.get(t), last=t == len(frames) - 1) for t, f in enumerate(frames)]


@pytest.mark.parametrize("name", ["stcn-s", "xmem-s"])
def test_tracker_fast_read_equals_dense_oracle(name, clip, monkeypatch):
    torch.manual_seed(0)
    net = corrvos.build_model(name).eval()
    frames, masks = clip
    fast = Tracker(net, size=None, top_k=6, **SMALL[name])
    got = _run(fast, frames, masks)
    memory_class = STCNMemory if name == "stcn-s" else XMemMemory
    monkeypatch.setattr(memory_class, "read", _dense_reference_read)
    oracle = Tracker(net, size=None, top_k=6, **SMALL[name])
    expected = _run(oracle, frames, masks)
    for t, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m: f"frame {t}: {m}")
    assert fast.memory_stats() == oracle.memory_stats()
    assert fast.object_ids == [1, 2, 3]
    if name == "xmem-s":
        stats = fast.memory_stats()
        assert stats.consolidations >= 2 and stats.long_term_elements > 0
    else:
        assert fast.memory.num_frames == 4  # the cap dropped frames (the buffer removed them in place)


def test_matches_explains_the_fast_read(clip):
    torch.manual_seed(0)
    net = corrvos.build_model("stcn-s").eval()
    readouts = []
    decode = net.decode
    net.decode = lambda feats, readout, *a, **k: readouts.append(readout) or decode(feats, readout, *a, **k)
    frames, masks = clip
    tracker = Tracker(net, size=None, top_k=6, mem_every=3)
    for t, frame in enumerate(frames[:8]):
        tracker.step(frame, masks.get(t))
    t = 7  # not a memory frame: the memory holds what frame 7 read
    assert tracker.last_mem_t != t
    values = tracker.memory.values()
    read = tracker.frame_read(t)
    fh, fw = readouts[-1].shape[-2:]
    for channel, obj in enumerate(tracker.object_ids):
        weights, _, _ = read.weights(obj)
        assert int((weights > 0).sum(0).max()) <= 6
        torch.testing.assert_close((values[channel] @ weights).view(-1, fh, fw), readouts[-1][0, channel])
    m = tracker.matches(t, 40, 30, object_id=3)
    assert float(m.weights[m.origin_frames < 5].sum()) == 0  # object 3 appeared at frame 5


# --- buffers ------------------------------------------------------------------------------------------
def test_element_buffer_grows_geometrically_and_keeps_content():
    buf = ElementBuffer(shrinkage=True)
    keys, shrinks, values, frames = [], [], [], []
    capacities = set()
    for f in range(40):
        k = torch.randn(1, 3, 5)
        s = torch.rand(1, 1, 5)
        objects = 1 if f < 10 else 2  # a second object from frame 10 on
        v = torch.randn(objects, 4, 5)
        buf.append(k, s, v, torch.full((5,), f))
        keys.append(k), shrinks.append(s), frames.append(torch.full((5,), f))
        values.append(torch.cat([v, torch.zeros(2 - objects, 4, 5)]) if objects == 1 else v)
        capacities.add(buf.capacity)
    assert len(capacities) <= 8  # 40 appends, a handful of reallocations
    assert torch.equal(buf.keys(), torch.cat(keys, 2))
    assert torch.equal(buf.shrinkages(), torch.cat(shrinks, 2))
    assert torch.equal(buf.values(), torch.cat(values, 2).permute(2, 0, 1))
    assert torch.equal(buf.element_frames(), torch.cat(frames))
    buf.remove(5, 15)  # frames 1 and 2 leave; the rest moves up
    keep = [0] + list(range(3, 40))
    assert torch.equal(buf.keys(), torch.cat([keys[i] for i in keep], 2))
    assert torch.equal(buf.values(), torch.cat([values[i] for i in keep], 2).permute(2, 0, 1))
    assert buf.element_frames().tolist() == [f for f in keep for _ in range(5)]


def test_stcn_memory_appends_without_reallocating_every_frame():
    mem = STCNMemory(top_k=3)
    mem.add_objects(0, 2)
    storages = set()
    for f in range(32):
        mem.add(f, torch.randn(1, 4, 2, 3), torch.randn(1, 2, 5, 2, 3))
        storages.add(mem._buffer.key.untyped_storage().data_ptr())
    assert len(storages) <= 7 and mem.num_elements == 32 * 6


# --- reduced precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["stcn", "xmem"])
def test_low_precision_labels_agree_with_fp32_and_memory_stays_fp32(arch, precision):
    frames, labels = moving_squares(20)
    options = dict(min_working_frames=2, max_working_frames=4, num_prototypes=8, max_long_term_elements=40)
    key_dtypes = []

    def track(prec):
        net = FakeVOSNet(arch)
        encode_key = net.encode_key
        net.encode_key = lambda *a, **k: (lambda f: key_dtypes.append(f.key.dtype) or f)(encode_key(*a, **k))
        tracker = Tracker(net, size=None, precision=prec, **options)
        out = [tracker.labels_from(tracker.step(f, labels[0] if t == 0 else None, last=t == len(frames) - 1))
               for t, f in enumerate(frames)]
        return tracker, np.stack(out)

    _, reference = track("fp32")
    tracker, low = track(precision)
    assert key_dtypes[-1] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # autocast was on
    buf = tracker.memory._buffer
    assert buf.key.dtype == buf.value.dtype == torch.float32
    assert tracker.frame_read(len(frames) - 2).query_key.dtype == torch.float32
    if arch == "xmem":
        assert tracker.memory.hidden.dtype == torch.float32 and tracker.memory_stats().consolidations >= 1
    assert (low == reference).mean() >= 0.98
    assert (low == np.stack(labels)).mean() >= 0.9  # and it still tracks


def test_bad_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        Tracker(FakeVOSNet("stcn"), precision="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["stcn-s", "xmem-s"])
def test_no_host_device_sync_on_frames_without_a_mask(name):
    torch.manual_seed(0)
    net = corrvos.build_model(name).cuda().eval()
    frames, labels = moving_squares(12, height=64, width=80, square=20)
    frames = [torch.from_numpy(f).cuda() for f in frames]
    tracker = Tracker(net, size=None, mem_every=3, min_working_frames=2, max_working_frames=6,
                      num_prototypes=8, max_long_term_elements=40)
    tracker.step(frames[0], labels[0])
    tracker.step(frames[1])  # first read: builds the cached group indices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for frame in frames[2:5]:  # memory frames included (no consolidation this early)
            tracker.step(frame)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_similarity_under_autocast_keeps_the_out_of_place_promotion():
    # No autograd but autocast on (e.g. a no-grad pass inside mixed-precision training): the result
    # must be the promoted fp32 of the out-of-place expression, not a bf16 product updated in place.
    mem, query, _, _ = _keys(3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sim = similarity(mem, query, query_major=True)
    assert sim.dtype == torch.float32
    a_sq = mem.pow(2).sum(1).unsqueeze(1)
    expected = 2 * (query.transpose(1, 2).bfloat16() @ mem.bfloat16()) - a_sq
    torch.testing.assert_close(sim, expected / 4, rtol=0, atol=0)
