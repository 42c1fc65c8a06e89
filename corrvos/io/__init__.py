"""Reading frames and masks, writing palette PNGs and H.264 videos, DAVIS folder layout."""
from corrvos.io.davis import (
    SharedSequence,
    annotation_paths,
    davis_sequences,
    read_split_file,
    frame_paths,
    read_annotation,
    read_shared_sequence,
)
from corrvos.io.masks import (
    PALETTE,
    check_mask,
    colorize,
    davis_palette,
    read_mask,
    write_mask,
)
from corrvos.io.video import (
    ImageFolderFrames,
    LoadedFrames,
    VideoFrames,
    VideoWriter,
    iter_video,
    load_frames,
    read_frame_folder,
    read_video,
    read_zip_of_frames,
    video_fps,
    write_video,
)

__all__ = [
    "PALETTE", "ImageFolderFrames", "LoadedFrames", "SharedSequence", "VideoFrames", "VideoWriter",
    "annotation_paths", "check_mask", "colorize", "davis_palette", "davis_sequences", "read_split_file", "frame_paths",
    "iter_video", "load_frames", "read_annotation", "read_frame_folder", "read_mask",
    "read_shared_sequence", "read_video", "read_zip_of_frames", "video_fps", "write_mask", "write_video",
]
