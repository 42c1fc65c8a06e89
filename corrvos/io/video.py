"""Reading frames (video files, frame folders, zips of frames) and writing browser-playable H.264 mp4.

Frames are always RGB uint8 ``HxWx3`` numpy arrays at their original size. Videos are decoded with
decord; where decord is not installed (the GPU machine has none) OpenCV's decoder is used instead.
Both decoders apply a phone video's rotation metadata (its display matrix), so portrait videos come out
upright, as players show them (tests/test_io.py checks it for each backend).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corrvos.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".gif")
DEFAULT_FPS = 24.0  # used for frame folders and zips, which carry no frame rate

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------- helpers

def natural_key(name: str) -> tuple:
    """Sort key that orders ``frame2`` before ``frame10`` (digit runs compare as numbers)."""
    # re.split with a capturing group alternates str, int, str, ... so positions always hold the same type.
    return tuple(int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", name)))


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence C-level writes to stderr (decord/ffmpeg log lines) so a bad file yields only our one sentence."""
    fd = 2  # native code writes to descriptor 2 whatever Python's sys.stderr currently is
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 2 (detached process): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _import_decord():
    """Import decord, loading OpenCV first.

    decord ships its own zlib/libpng; imported before cv2 it wins the symbol lookup and every later
    ``cv2.imread`` of a PNG fails ("libpng error: bad parameters to zlib"). cv2 first keeps both working.
    """
    import cv2  # noqa: F401

    import decord

    return decord


def _have_decord() -> bool:
    try:
        _import_decord()
    except ImportError:
        return False
    return True


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"the {what} {path} does not exist; check the path.")
    if path.is_dir():
        raise InputError(f"the {what} {path} is a folder, not a file; give the path of the file itself.")


# ----------------------------------------------------------------------------------------------- videos

class VideoFrames(Sequence[np.ndarray]):
    """A video opened for lazy, random-access decoding: ``len(v)``, ``v[t]`` and iteration give RGB uint8 frames.

    Sequential access (iteration, increasing indices) is cheap; random access seeks and costs more.
    Use this rather than :func:`read_video` for long videos, whose decoded frames would not fit in memory.
    """

    def __init__(self, path: PathLike, backend: str | None = None):
        self.path = Path(path)
        _require_file(self.path, "video file")
        if self.path.stat().st_size == 0:
            raise InputError(f"the video file {self.path} is empty (0 bytes); upload or copy it again.")
        self.backend = backend or ("decord" if _have_decord() else "cv2")
        if self.backend == "decord":
            self._open_decord()
        elif self.backend == "cv2":
            self._open_cv2()
        else:
            raise ValueError(f"unknown video backend {self.backend!r} (expected 'decord' or 'cv2')")
        if self._length == 0:
            raise InputError(f"the video {self.path} contains no frames; give a video with at least one frame.")

    def _unreadable(self) -> InputError:
        return InputError(
            f"could not read {self.path} as a video (the file is corrupt or not a video format ffmpeg can decode); "
            "convert it to an H.264 mp4 and try again."
        )

    def _open_decord(self) -> None:
        decord = _import_decord()

        decord.logging.set_level(decord.logging.QUIET)
        try:
            with _quiet_native_stderr():
                self._reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0))
        except (RuntimeError, decord.DECORDError) as err:
            raise self._unreadable() from err
        self._length = len(self._reader)
        fps = float(self._reader.get_avg_fps()) if self._length else 0.0
        self.fps = fps if np.isfinite(fps) and fps > 0 else DEFAULT_FPS

    def _open_cv2(self) -> None:
        import cv2

        with _quiet_native_stderr():
            cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise self._unreadable()
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else DEFAULT_FPS
        # CAP_PROP_FRAME_COUNT is an estimate from the container; decode once so len() is exact.
        frames = []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        cap.release()
        self._cv2_frames = frames
        self._length = len(frames)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, t):  # type: ignore[override]
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(self._length))]
        if t < 0:
            t += self._length
        if not 0 <= t < self._length:
            raise IndexError(f"frame {t} is out of range for a video of {self._length} frames")
        if self.backend == "cv2":
            return self._cv2_frames[t]
        try:
            return self._reader[t].asnumpy()
        except Exception as err:  # decord raises its own error types mid-file on truncated videos
            raise InputError(
                f"could not decode frame {t} of {self.path} (the file may be truncated); re-encode the video and try again."
            ) from err

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return tuple(self[0].shape[:2])  # type: ignore[return-value]


def read_video(path: PathLike) -> list[np.ndarray]:
    """Decode every frame of a video file into a list of RGB uint8 ``HxWx3`` arrays."""
    return list(VideoFrames(path))


def iter_video(path: PathLike) -> Iterator[np.ndarray]:
    """Yield the frames of a video one by one (constant memory for long videos)."""
    yield from VideoFrames(path)


def video_fps(path: PathLike) -> float:
    """Average frame rate of a video (``DEFAULT_FPS`` when the container does not say)."""
    return VideoFrames(path).fps


# ----------------------------------------------------------------------------------------------- images

def _decode_image(data: bytes | Path, label: str) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            # Phone photos store their orientation in EXIF; apply it so frames and masks line up.
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB")).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"could not read the image {label}; replace it with a valid JPEG or PNG file.") from err


def _check_same_size(frames: Sequence[np.ndarray], labels: Sequence[str]) -> None:
    h, w = frames[0].shape[:2]
    for frame, label in zip(frames, labels):
        if frame.shape[:2] != (h, w):
            fh, fw = frame.shape[:2]
            raise InputError(
                f"frame {label} is {fh}x{fw} (height x width) but the first frame is {h}x{w}; "
                "all frames must have the same size."
            )


def _image_names(names: Iterable[str], where: str) -> list[str]:
    images = sorted((n for n in names if n.lower().endswith(IMAGE_SUFFIXES)), key=lambda n: natural_key(Path(n).name))
    if not images:
        raise InputError(f"{where} contains no .jpg or .png images; put the frames there as image files.")
    stems = [Path(n).stem for n in images]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise InputError(
            f"{where} holds several images named {dup!r} (for example a .jpg and a .png); keep one file per frame name."
        )
    return images


class ImageFolderFrames(Sequence[np.ndarray]):
    """The images of a folder in natural order, decoded lazily; ``names`` holds their stems."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(
                f"the frame folder {self.folder} does not exist or is not a folder; check the path."
            )
        files = _image_names((p.name for p in self.folder.iterdir() if p.is_file()), f"the frame folder {self.folder}")
        self.paths = [self.folder / f for f in files]
        self.names = [p.stem for p in self.paths]
        self._size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, t):  # type: ignore[override]
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        path = self.paths[t]
        frame = _decode_image(path, str(path))
        if self._size is None:
            self._size = self.size
        if frame.shape[:2] != self._size:
            _check_same_size([self[0], frame], [self.names[0], path.name])
        return frame

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the first frame (all frames must share it)."""
        if self._size is None:
            self._size = tuple(_decode_image(self.paths[0], str(self.paths[0])).shape[:2])  # type: ignore[assignment]
        return self._size  # type: ignore[return-value]


def read_frame_folder(folder: PathLike) -> tuple[list[np.ndarray], list[str]]:
    """Read every .jpg/.png of a folder, naturally sorted: (frames, stems). Stems name the output masks."""
    source = ImageFolderFrames(folder)
    frames = [_decode_image(p, str(p)) for p in source.paths]
    _check_same_size(frames, [p.name for p in source.paths])
    return frames, source.names


def read_zip_of_frames(path: PathLike) -> tuple[list[np.ndarray], list[str]]:
    """Read the .jpg/.png images of a zip (in any sub-folder), naturally sorted by file name: (frames, stems)."""
    path = Path(path)
    _require_file(path, "zip file")
    try:
        with zipfile.ZipFile(path) as zf:
            members = [
                info.filename for info in zf.infolist()
                # macOS adds __MACOSX/._name resource forks that look like images but are not.
                if not info.is_dir() and "__MACOSX/" not in info.filename and not Path(info.filename).name.startswith("._")
            ]
            images = _image_names(members, f"the zip file {path}")
            frames = [_decode_image(zf.read(m), f"{m} in {path}") for m in images]
    except zipfile.BadZipFile as err:
        raise InputError(f"{path} is not a readable zip file; give a zip of JPEG/PNG frames, a frame folder or a video.") from err
    _check_same_size(frames, images)
    return frames, [Path(m).stem for m in images]


# ----------------------------------------------------------------------------------------------- dispatch

@dataclass
class LoadedFrames:
    """Frames of one clip with the names their outputs get and the frame rate for the overlay video."""

    frames: Sequence[np.ndarray]   # RGB uint8 HxWx3 (a lazy sequence when loaded with lazy=True)
    names: list[str]               # output stems: input image stems, or 00000, 00001, ... for videos
    fps: float

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        frames = self.frames
        if isinstance(frames, (VideoFrames, ImageFolderFrames)):
            return frames.size
        return tuple(frames[0].shape[:2])  # type: ignore[return-value]


def load_frames(source: PathLike, lazy: bool = False, fps: float | None = None) -> LoadedFrames:
    """Read a video file, a folder of frames or a zip of frames.

    ``lazy=True`` keeps videos and folders on disk and decodes frames when they are indexed or iterated.
    ``fps`` overrides the frame rate (folders and zips otherwise get ``DEFAULT_FPS``).
    """
    path = Path(source)
    if path.is_dir():
        folder = ImageFolderFrames(path)
        frames: Sequence[np.ndarray] = folder if lazy else read_frame_folder(path)[0]
        return LoadedFrames(frames, list(folder.names), fps or DEFAULT_FPS)
    if not path.exists():
        raise InputError(f"the input {path} does not exist; give a video file, a frame folder or a zip of frames.")
    if path.suffix.lower() == ".zip" or (path.suffix.lower() not in VIDEO_SUFFIXES and zipfile.is_zipfile(path)):
        frames, names = read_zip_of_frames(path)
        return LoadedFrames(frames, names, fps or DEFAULT_FPS)
    video = VideoFrames(path)
    names = [f"{t:05d}" for t in range(len(video))]
    return LoadedFrames(video if lazy else list(video), names, fps or video.fps)


# ----------------------------------------------------------------------------------------------- writing

def _even(frame: np.ndarray) -> np.ndarray:
    """Pad odd sizes by one edge pixel: yuv420p needs even sizes, and padding avoids ffmpeg rescaling the frame."""
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frame


class VideoWriter:
    """Streaming, atomic H.264 mp4 writer (yuv420p, faststart): browsers play the result.

    Frames go to a temporary file next to ``path``; ``close()`` moves it into place, so a crash
    never leaves a half-written video under the final name. Use as a context manager.
    Odd frame sizes are padded by one pixel at the right/bottom.
    """

    def __init__(self, path: PathLike, fps: float = DEFAULT_FPS, quality_crf: int = 18):
        self.path = Path(path)
        self.fps = float(fps)
        self.crf = int(quality_crf)
        self._tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.mp4")
        self._gen = None
        self._size: tuple[int, int] | None = None
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 ``HxWx3`` frame (all frames must have the first frame's size)."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 HxWx3 frame, got shape {frame.shape} and dtype {frame.dtype}")
        frame = _even(frame)
        if self._gen is None:
            import imageio_ffmpeg

            self._size = frame.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._gen = imageio_ffmpeg.write_frames(
                str(self._tmp), (frame.shape[1], frame.shape[0]), fps=self.fps, codec="libx264",
                pix_fmt_in="rgb24", pix_fmt_out="yuv420p", macro_block_size=2, quality=None,
                output_params=["-crf", str(self.crf), "-movflags", "+faststart"], ffmpeg_log_level="error",
            )
            self._gen.send(None)
        elif frame.shape[:2] != self._size:
            raise ValueError(f"frame size {frame.shape[:2]} differs from the video's {self._size}")
        self._gen.send(np.ascontiguousarray(frame))
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file and move it to its final name (an error if no frame was written)."""
        if self._gen is None:
            raise ValueError(f"no frames were written to {self.path}")
        self._gen.close()
        self._gen = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        if self._gen is not None:
            with contextlib.suppress(Exception):
                self._gen.close()
            self._gen = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: PathLike, frames: Iterable[np.ndarray], fps: float = DEFAULT_FPS) -> Path:
    """Write RGB uint8 frames to a browser-playable H.264 mp4, atomically; returns the path."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)
