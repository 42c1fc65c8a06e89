"""Tracker: one per-frame entry point for STCN and XMem (streaming, offline evaluation and the app).

``step(image, mask=None, objects=None)`` follows the upstream inference loops (reference-models.md 1.9
and 2.6): pad to /16 (centred, zeros after normalisation), optional resize so the short side is
``size``, key encoding once per frame, a memory read shared by all objects, decoding, soft
aggregation; masks given on later frames add objects (YouTube-VOS style) or overwrite existing ones.

``matches(t, x, y)`` recomputes, from a per-frame cache of the query key and a snapshot of the memory
the read used, the weights that read gave every memory element: same similarity, same top-k, same
per-object validity (see memory_common).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrvos.errors import InputError
from corrvos.imageops import Pad, aggregate, normalize, pad_divide_by, to_float_image, unpad
from corrvos.inference.memory_common import Memory, MemorySnapshot, snapshot_weights
from corrvos.models.registry import arch_spec
from corrvos.precision import PRECISIONS, autocast_dtype


@dataclass(frozen=True)
class Matches:
    """Where the memory read of frame ``frame`` sent pixel (x, y), as weights on memory elements.

    ``heatmaps[i]`` is the weight each feature position of memory frame ``memory_frames[i]`` received
    (long-term prototypes count at the frame and position they were taken from); the weights of all
    heatmaps sum to 1. ``top`` lists the ``k`` heaviest elements as (frame, x, y, weight) with x, y the
    centre of the element's 16x16 cell in input-image coordinates. ``weights`` are the raw per-element
    weights in the memory's read order (``origin_frames``/``origin_positions`` say where each came from).
    """

    frame: int
    x: int
    y: int
    object_id: int
    feature_size: tuple[int, int]
    memory_frames: list[int]
    heatmaps: Tensor  # (n_memory_frames, h, w), CPU float32
    top: list[tuple[int, float, float, float]]
    weights: Tensor  # (N,), CPU float32
    origin_frames: Tensor  # (N,) int64
    origin_positions: Tensor  # (N,) int64


@dataclass(frozen=True)
class MemoryStats:
    """Sizes for display: memory frames and elements (XMem: working / long-term)."""

    frames_processed: int
    objects: int
    memory_frames: int  # frames in the STCN bank / XMem working memory
    working_elements: int  # STCN: every element of the bank
    long_term_elements: int  # always 0 for STCN
    consolidations: int

    @property
    def elements(self) -> int:
        return self.working_elements + self.long_term_elements


@dataclass(frozen=True)
class FrameGeometry:
    """How input pixels map to the padded, possibly resized, network input and its stride-16 grid."""

    input_size: tuple[int, int]  # (H, W) of the frames given to step
    proc_size: tuple[int, int]  # after the optional resize
    pad: Pad  # (left, right, top, bottom)
    feature_size: tuple[int, int]  # stride-16 grid of the padded frame

    @property
    def resized(self) -> bool:
        return self.proc_size != self.input_size

    def to_feature(self, x: int, y: int) -> tuple[int, int]:
        (ih, iw), (ph, pw) = self.input_size, self.proc_size
        px = (x + 0.5) * pw / iw - 0.5 + self.pad[0]
        py = (y + 0.5) * ph / ih - 0.5 + self.pad[2]
        fh, fw = self.feature_size
        return min(max(int(py // 16), 0), fh - 1), min(max(int(px // 16), 0), fw - 1)

    def to_image(self, row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
        """Centres of stride-16 cells (row, col) in input-image coordinates (clamped to the image)."""
        (ih, iw), (ph, pw) = self.input_size, self.proc_size
        px = col.double() * 16 + 7.5 - self.pad[0]
        py = row.double() * 16 + 7.5 - self.pad[2]
        x = ((px + 0.5) * iw / pw - 0.5).clamp(0, iw - 1)
        y = ((py + 0.5) * ih / ph - 0.5).clamp(0, ih - 1)
        return x, y


@dataclass(frozen=True)
class FrameRead:
    """What the memory read of one frame used: its query side and the memory as it was."""

    query_key: Tensor  # (Ck, h*w)
    query_selection: Tensor | None  # (Ck, h*w), XMem
    snapshot: MemorySnapshot
    object_ids: tuple[int, ...]  # objects tracked at that frame, in channel order

    def weights(self, object_id: int | None = None, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Read weights ``(N, M)`` of the query ``positions`` (flat feature indices; default all) for
        one object's read (default the first object), with the elements' origin frames and positions."""
        channel = 0 if object_id is None else self.object_ids.index(object_id)
        key, sel = self.query_key, self.query_selection
        if positions is not None:
            key = key[:, positions]
            sel = None if sel is None else sel[:, positions]
        return snapshot_weights(self.snapshot, key, sel, channel)


class Tracker:
    """Semi-supervised video object segmentation with an STCN or XMem network.

    Args:
        model: a network from :func:`corrvos.build_model` / :func:`corrvos.load_model` (or anything with
            the same ``encode_key`` / ``encode_value`` / ``decode`` / ``config`` interface).
        device: where to run; None keeps the model's device (a given device moves the model there).
        top_k: memory read top-k; None picks upstream's (20 for STCN, 30 for XMem).
        mem_every: memory-frame spacing (STCN: absolute ``t % mem_every == 0``; XMem: relative to the
            last memory frame). Frames given a mask are always memory frames; the last frame never is
            (when known: ``step(..., last=True)`` or :meth:`propagate`).
        size: resize so the shorter side is ``size`` (bilinear on the image, nearest on masks,
            probabilities resized back bilinearly); None processes frames at their own size.
        max_memory_frames: STCN only: cap on the bank (drops the oldest frames not given a mask).
        enable_long_term, min_working_frames, max_working_frames, num_prototypes,
        max_long_term_elements: XMem memory options (upstream defaults).
        deep_update_every: XMem: -1 (upstream's default) deep-updates the sensory memory on every memory
            frame and lets the decoder update it on the other frames; N >= 1 is upstream's unsynchronised
            mode: the decoder updates it on every frame but the last, and a memory frame also deep-updates
            it when N frames have passed since the last deep update.
        match_cache_frames: how many recent frames :meth:`matches` can explain (their query keys and
            memory snapshots are kept); None keeps every frame, 0 none.
        precision: "fp32", or "bf16" / "fp16" to run the network (key and value encoders, decoder)
            under ``torch.autocast``. The memory stays fp32 in every mode: keys, shrinkage, selection,
            values and the hidden state are stored as fp32, and the similarity, top-k softmax and
            readout run in fp32 with autocast switched off (low-precision similarities of nearby
            keys tie and reorder the top-k); soft aggregation runs on fp32 logits.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        top_k: int | None = None,
        mem_every: int = 5,
        size: int | None = None,
        *,
        max_memory_frames: int | None = None,
        enable_long_term: bool = True,
        min_working_frames: int = 5,
        max_working_frames: int = 10,
        num_prototypes: int = 128,
        max_long_term_elements: int = 10000,
        deep_update_every: int = -1,
        match_cache_frames: int | None = 300,
        precision: str = "fp32",
    ) -> None:
        config = model.config
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        spec = arch_spec(config)  # ValueError for an unknown architecture
        if mem_every < 1:
            raise ValueError("mem_every must be at least 1")
        if deep_update_every != -1 and deep_update_every < 1:
            raise ValueError("deep_update_every must be -1 (with every memory frame) or at least 1")
        if size is not None and size < 16:
            raise ValueError("size must be at least 16 (or None for no resize)")
        if device is not None:
            model = model.to(device)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.eval()
        self.arch: str = config.arch
        self.spec = spec
        self.top_k = spec.default_top_k if top_k is None else top_k
        self.mem_every = mem_every
        self.size = size
        self.max_memory_frames = max_memory_frames
        self.deep_update_every = deep_update_every
        # Every architecture's memory options; the memory class takes its own (Memory.for_tracker).
        self._memory_options = dict(
            max_memory_frames=max_memory_frames,
            enable_long_term=enable_long_term,
            min_working_frames=min_working_frames,
            max_working_frames=max_working_frames,
            num_prototypes=num_prototypes,
            max_long_term_elements=max_long_term_elements,
        )
        self.match_cache_frames = match_cache_frames
        self.precision = precision
        self.reset()

    # lifecycle ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the video: memory, objects, cached frames."""
        self.t = -1
        self.last_mem_t = 0
        self.last_deep_update_t = -self.deep_update_every  # unsynchronised mode: the first memory frame updates
        self.object_ids: list[int] = []
        self._geometry: FrameGeometry | None = None
        self._records: OrderedDict[int, FrameRead] = OrderedDict()
        self.memory: Memory = self.spec.memory.for_tracker(self.top_k, self.model.config, self._memory_options)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def geometry(self) -> FrameGeometry | None:
        """Input -> network-input mapping of the current video (None before its first frame)."""
        return self._geometry

    def frame_read(self, t: int) -> FrameRead | None:
        """The cached memory read of frame ``t`` (None: no read, or it left the match cache)."""
        return self._records.get(t)

    @property
    def memory_options(self) -> dict:
        """The memory options this tracker's architecture uses (STCN's cap; XMem's working / long-term sizes)."""
        return self.memory.options()

    def memory_stats(self) -> MemoryStats:
        return MemoryStats(self.t + 1, self.num_objects, *self.memory.stats())

    # input preparation -------------------------------------------------------------------------------
    def _geometry_for(self, t: int, height: int, width: int) -> FrameGeometry:
        """The video's geometry (computed from its first frame; stored by :meth:`step` once valid)."""
        if self._geometry is not None:
            if self._geometry.input_size != (height, width):
                h0, w0 = self._geometry.input_size
                raise InputError(
                    f"Frame {t} is {width}x{height} but the video started at {w0}x{h0}; "
                    "all frames of a video must have the same size."
                )
            return self._geometry
        proc = (height, width)
        if self.size is not None and min(height, width) != self.size:
            # Same rounding as torchvision's Resize(int): the long side is truncated.
            short, long = min(height, width), max(height, width)
            new_long = int(self.size * long / short)
            proc = (self.size, new_long) if height <= width else (new_long, self.size)
        ph, pw = (-proc[0]) % 16 + proc[0], (-proc[1]) % 16 + proc[1]
        top, left = (ph - proc[0]) // 2, (pw - proc[1]) // 2
        pad = (left, pw - proc[1] - left, top, ph - proc[0] - top)
        return FrameGeometry((height, width), proc, pad, (ph // 16, pw // 16))

    def _prepare_image(self, t: int, image: np.ndarray | Tensor) -> tuple[Tensor, FrameGeometry]:
        try:
            img = to_float_image(image)
        except ValueError as err:
            raise InputError(f"Frame {t} is not an RGB image ({err}); give HxWx3 uint8 frames.") from None
        geometry = self._geometry_for(t, img.shape[1], img.shape[2])
        img = normalize(img.to(self.device)).unsqueeze(0)
        if geometry.resized:
            # Upstream XMem resizes the normalised tensor (old torchvision: no antialiasing on tensors).
            img = F.interpolate(img, size=geometry.proc_size, mode="bilinear", align_corners=False)
        img, _ = pad_divide_by(img, 16)
        return img, geometry

    def _prepare_mask(self, t: int, mask: np.ndarray | Tensor, geometry: FrameGeometry) -> Tensor:
        """Label map -> ``(H, W)`` int64 tensor on the device, validated against the frame."""
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        if not torch.is_tensor(mask) or mask.dim() != 2:
            raise InputError(f"The mask for frame {t} must be a 2-D label map (HxW integers, 0 = background).")
        if mask.is_floating_point() and not torch.equal(mask, mask.round()):
            raise InputError(f"The mask for frame {t} has non-integer values; give object ids 1..255.")
        if tuple(mask.shape) != geometry.input_size:
            (h, w), (mh, mw) = geometry.input_size, mask.shape
            raise InputError(
                f"The mask for frame {t} is {mw}x{mh} but the frame is {w}x{h}; give a mask of the frame's size."
            )
        mask = mask.to(self.device, torch.long)
        if int(mask.min()) < 0 or int(mask.max()) > 255:
            raise InputError(f"The mask for frame {t} has labels outside 0..255; use object ids 1..255.")
        return mask

    # precision ----------------------------------------------------------------------------------------
    def _network(self) -> contextlib.AbstractContextManager:
        """Autocast for the network's calls in bf16/fp16 mode; nothing in fp32."""
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _fp32(self) -> contextlib.AbstractContextManager:
        """The memory side always runs in fp32, even when the caller wrapped ``step`` in autocast."""
        if not torch.is_autocast_enabled(self.device.type):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)

    # the per-frame step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(
        self,
        image: np.ndarray | Tensor,
        mask: np.ndarray | Tensor | None = None,
        objects: Sequence[int] | None = None,
        *,
        last: bool = False,
        complete: bool = False,
    ) -> Tensor:
        """Process the next frame.

        Args:
            image: RGB ``HxWx3`` uint8 array, or a float tensor in [0, 1] (``3xHxW`` or ``HxWx3``).
            mask: optional label map ``HxW`` (0 background, object ids 1..255). Ids not seen before
                become new objects from this frame on; ids already tracked are overwritten by it.
            objects: the ids this mask speaks for (default: the ids present in it). Tracked objects
                outside this list keep their prediction, except where the mask claims the pixel.
            last: this is the video's last frame (it is then not added to memory).
            complete: with ``objects`` left out, the mask speaks for every tracked object as well as
                the ids in it (one it leaves out is absent in this frame), as a user's correction does.

        Returns:
            ``(K + 1, H, W)`` probabilities at the input size, background first, then the objects in
            the order of :attr:`object_ids`.
        """
        t = self.t + 1
        img, geometry = self._prepare_image(t, image)
        labels = None if mask is None else self._prepare_mask(t, mask, geometry)
        if labels is None and self.num_objects == 0:
            raise InputError("The first frame needs a mask: give a label map with at least one object.")

        given: list[int] = []
        if labels is not None:
            present = [int(v) for v in torch.unique(labels).tolist() if v != 0]
            if objects is None:
                given = sorted(set(present) | (set(self.object_ids) if complete else set()))
            else:
                given = sorted({int(o) for o in objects})
            if self.num_objects == 0 and not present:
                raise InputError("The first-frame mask is empty; mark at least one object with a label above 0.")
            if any(not 1 <= o <= 255 for o in given):
                raise InputError(f"The objects given for frame {t} must be ids between 1 and 255.")
        # Valid input: only now does the tracker's state move on.
        self.t = t
        self._geometry = geometry
        new_ids = [o for o in given if o not in self.object_ids]
        all_given = set(self.object_ids).issubset(given)

        spec = self.spec
        if spec.relative_memory_schedule:  # XMem: mem_every frames after the last memory frame
            scheduled = t - self.last_mem_t >= self.mem_every
        else:  # STCN: every mem_every-th frame of the video
            scheduled = t % self.mem_every == 0
        is_mem_frame = (scheduled or labels is not None) and not last
        need_segment = self.num_objects > 0 and not all_given
        # XMem's sensory memory: a deep update needs the value encoder, so it only happens on memory frames
        # (all of them by default, then the decoder updates it on the others; the last frame updates nothing).
        synchronised = self.deep_update_every == -1
        is_deep_update = is_mem_frame and (synchronised or t - self.last_deep_update_t >= self.deep_update_every)
        is_normal_update = (not synchronised or not is_deep_update) and not last

        mem = self.memory
        need_selection = spec.key_extras and (mem.keeps_selection or need_segment)
        with self._network():
            feats = self.model.encode_key(img, need_shrinkage=spec.key_extras and is_mem_frame,
                                          need_selection=need_selection)
        # The memory side (keys, shrinkage, selection) is fp32 in every precision mode.
        feats = feats._replace(key=feats.key.float(), shrinkage=_float(feats.shrinkage),
                               selection=_float(feats.selection))

        prob_with_bg: Tensor | None = None
        if need_segment:
            with self._fp32():
                readout = mem.read(feats.key, feats.selection)
            with self._network():
                new_hidden, logits = self.model.decode(feats, readout, mem.hidden, update_hidden=is_normal_update)
            prob_with_bg = torch.softmax(aggregate(torch.sigmoid(logits[0].float()), dim=0), dim=0)
            if is_normal_update and new_hidden is not None:
                mem.hidden = _float(new_hidden)
            self._remember(t, feats, geometry)

        if labels is not None:
            if new_ids:
                self.object_ids.extend(new_ids)
                mem.add_objects(t, len(new_ids), feats.key)
            prob_with_bg = self._merge_mask(labels, given, prob_with_bg, geometry)

        if is_mem_frame:
            masks = prob_with_bg[1:].unsqueeze(0)
            others = _others(masks)
            with self._network():
                value, new_hidden = self.model.encode_value(img, feats, mem.hidden, masks, others,
                                                            deep_update=is_deep_update)
            with self._fp32():  # XMem's consolidation computes similarities too
                mem.memorise(t, feats, value.float(), given=labels is not None)
            if is_deep_update and new_hidden is not None:
                mem.hidden = _float(new_hidden)
            if is_deep_update:
                self.last_deep_update_t = t
            self.last_mem_t = t

        return self._to_input(prob_with_bg, geometry)

    @staticmethod
    def _to_input(prob: Tensor, geometry: FrameGeometry) -> Tensor:
        """``(K+1, Hp, Wp)`` probabilities on the padded network input -> ``(K+1, H, W)`` at the input size."""
        out = unpad(prob, geometry.pad)
        if geometry.resized:
            out = F.interpolate(out.unsqueeze(0), size=geometry.input_size, mode="bilinear", align_corners=False)[0]
        return out

    def _merge_mask(self, labels: Tensor, given: list[int], pred: Tensor | None, geometry: FrameGeometry) -> Tensor:
        """One-hot of the given ids + the prediction for the others -> aggregated ``(K+1, Hp, Wp)``."""
        # Only the ids this mask speaks for claim pixels; -1 matches no label.
        ids = [o if o in given else -1 for o in self.object_ids]
        onehot = (labels.unsqueeze(0) == torch.tensor(ids, device=labels.device).view(-1, 1, 1)).float()
        if geometry.resized:
            onehot = F.interpolate(onehot.unsqueeze(0), size=geometry.proc_size, mode="nearest")[0]
        onehot, _ = pad_divide_by(onehot, 16)
        if pred is not None:
            pred_objects = pred[1:].clone()
            pred_objects[:, onehot.sum(0) > 0.5] = 0
            for channel in range(pred_objects.shape[0]):
                if self.object_ids[channel] not in given:
                    onehot[channel] = pred_objects[channel]
        return torch.softmax(aggregate(onehot, dim=0), dim=0)

    def _remember(self, t: int, feats, geometry: FrameGeometry) -> None:
        if self.match_cache_frames == 0:
            return
        sel = feats.selection
        self._records[t] = FrameRead(
            feats.key[0].flatten(1),
            None if sel is None else sel[0].flatten(1),
            self.memory.snapshot(),
            tuple(self.object_ids),
        )
        if self.match_cache_frames is not None:
            while len(self._records) > self.match_cache_frames:
                self._records.popitem(last=False)

    # whole videos ------------------------------------------------------------------------------------
    def propagate(
        self,
        frames: Iterable[np.ndarray | Tensor],
        first_mask: np.ndarray | Tensor,
        masks: Mapping[int, np.ndarray | Tensor] | None = None,
        *,
        complete_masks: bool = False,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Segment a whole video from its first-frame mask (resets the tracker first).

        Args:
            frames: any iterable of RGB ``HxWx3`` uint8 frames (read lazily, one frame ahead).
            first_mask: label map of frame 0.
            masks: optional later label maps ``{t: mask}`` that add (or correct) objects.
            complete_masks: a later mask speaks for every tracked object (one it leaves out is absent
                in that frame), as a user's correction does; by default it speaks only for the ids in it.

        Yields:
            ``(t, labels)`` with ``labels`` a ``HxW`` uint8 map of object ids (0 = background).
        """
        for t, prob in self.propagate_probabilities(frames, first_mask, masks, complete_masks=complete_masks):
            yield t, self.labels_from(prob)

    def propagate_probabilities(
        self,
        frames: Iterable[np.ndarray | Tensor],
        first_mask: np.ndarray | Tensor,
        masks: Mapping[int, np.ndarray | Tensor] | None = None,
        *,
        complete_masks: bool = False,
    ) -> Iterator[tuple[int, Tensor]]:
        """:meth:`propagate` yielding ``(t, probabilities)``, the ``(K + 1, H, W)`` tensor of :meth:`step`;
        :meth:`labels_from` and :meth:`soft_masks` read it while the generator waits at that frame."""
        self.reset()
        it = iter(frames)
        try:
            current = next(it)
        except StopIteration:
            raise InputError("The video has no frames; give a video with at least one frame.") from None
        t = 0
        while True:
            try:
                upcoming, last = next(it), False
            except StopIteration:
                upcoming, last = None, True
            mask = first_mask if t == 0 else (masks or {}).get(t)
            yield t, self.step(current, mask, last=last, complete=complete_masks)
            if last:
                return
            current, t = upcoming, t + 1

    def labels_from(self, prob: Tensor) -> np.ndarray:
        """``(K+1, H, W)`` probabilities -> ``HxW`` uint8 label map of object ids."""
        lut = torch.tensor([0, *self.object_ids], dtype=torch.uint8, device=prob.device)
        return lut[prob.argmax(dim=0)].cpu().numpy()

    def soft_masks(self, prob: Tensor) -> dict[int, np.ndarray]:
        """``(K+1, H, W)`` probabilities of the latest frame -> ``{object id: HxW uint8}``, the object's
        probability times 255 (a soft matte: edges keep the model's uncertainty instead of a hard cut)."""
        scaled = (prob[1:].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return dict(zip(self.object_ids, scaled))

    # what the memory read did ------------------------------------------------------------------------
    @torch.inference_mode()
    def matches(self, t: int, x: int, y: int, k: int = 10, object_id: int | None = None) -> Matches:
        """The weights the memory read of frame ``t`` gave each memory element for pixel (x, y).

        Args:
            t: a processed frame that read memory (not one whose mask gave every object).
            x, y: pixel in input-image coordinates.
            k: number of top matches to list.
            object_id: whose read (objects first seen on the same frame share one); default the first.
        """
        record = self._records.get(t)
        if record is None:
            if not 0 <= t <= self.t:
                raise InputError(f"Frame {t} has not been processed; frames 0..{self.t} have.")
            raise InputError(
                f"Frame {t} has no memory read to show (it was given a full mask or left the match cache); "
                "pick a later frame or raise match_cache_frames."
            )
        geometry = self._geometry
        h_in, w_in = geometry.input_size
        if not (0 <= x < w_in and 0 <= y < h_in):
            raise InputError(f"Pixel ({x}, {y}) is outside the {w_in}x{h_in} frame.")
        object_id = record.object_ids[0] if object_id is None else object_id
        if object_id not in record.object_ids:
            raise InputError(f"Object {object_id} was not tracked at frame {t}; choose one of {list(record.object_ids)}.")
        row, col = geometry.to_feature(x, y)
        fh, fw = geometry.feature_size
        pos = row * fw + col
        weights, frames, positions = record.weights(object_id, torch.tensor([pos], device=record.query_key.device))
        weights = weights[:, 0].float().cpu()

        memory_frames = sorted(set(frames.tolist()))
        slot = torch.tensor([memory_frames.index(f) for f in frames.tolist()], dtype=torch.long)
        heatmaps = torch.zeros(len(memory_frames), fh * fw)
        heatmaps.index_put_((slot, positions), weights, accumulate=True)

        top_w, top_i = torch.topk(weights, k=min(k, weights.numel()))
        xs, ys = geometry.to_image(positions[top_i] // fw, positions[top_i] % fw)
        top = [
            (int(frames[i]), float(xi), float(yi), float(wi))
            for i, xi, yi, wi in zip(top_i.tolist(), xs.tolist(), ys.tolist(), top_w.tolist())
        ]
        return Matches(
            frame=t,
            x=x,
            y=y,
            object_id=object_id,
            feature_size=(fh, fw),
            memory_frames=memory_frames,
            heatmaps=heatmaps.view(len(memory_frames), fh, fw),
            top=top,
            weights=weights,
            origin_frames=frames,
            origin_positions=positions,
        )


def _float(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.float()


def _others(masks: Tensor) -> Tensor:
    """``(1, K, H, W)`` -> for each object the sum of the other objects' probabilities (zeros if K == 1).

    Summed explicitly (not total minus self) so the value encoder sees the same numbers as upstream.
    """
    k = masks.shape[1]
    if k == 1:
        return torch.zeros_like(masks)
    return torch.stack([masks[:, [j for j in range(k) if j != i]].sum(dim=1) for i in range(k)], dim=1)
