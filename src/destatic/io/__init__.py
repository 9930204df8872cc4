"""Files in and out, below every other layer: safetensors and JSON reading
(:mod:`destatic.io.weights`), atomic writes and checksums (:mod:`destatic.io.files`), and the
one-line errors of both (:mod:`destatic.io.errors`). Nothing here knows a model class."""

from destatic.io.audio import (
    AudioFileError,
    read_audio,
    read_audio_request,
    spectrogram_image,
    write_audio,
)
from destatic.io.errors import WRITE_ERRORS, CheckpointError, CheckpointWriteError
from destatic.io.files import (
    CHECKSUMS_NAME,
    atomic_file,
    atomic_files,
    atomic_folder,
    file_sha256,
    fsync_dir,
    fsync_file,
    probe_writable,
    verify_checksums,
    write_atomic,
    write_checksums,
    write_error_reason,
)
from destatic.io.video import read_video, read_video_comment, write_video
from destatic.io.weights import (
    CONFIG_NAME,
    SAVE_WEIGHTS_NAME,
    find_weights,
    load_safetensors,
    load_weights,
    read_json,
    read_model_index,
    read_safetensors_header,
)

__all__ = [
    "CHECKSUMS_NAME",
    "CONFIG_NAME",
    "SAVE_WEIGHTS_NAME",
    "WRITE_ERRORS",
    "AudioFileError",
    "CheckpointError",
    "CheckpointWriteError",
    "atomic_file",
    "atomic_files",
    "atomic_folder",
    "file_sha256",
    "find_weights",
    "fsync_dir",
    "fsync_file",
    "load_safetensors",
    "load_weights",
    "probe_writable",
    "read_audio",
    "read_audio_request",
    "read_json",
    "read_model_index",
    "read_safetensors_header",
    "read_video",
    "read_video_comment",
    "spectrogram_image",
    "verify_checksums",
    "write_atomic",
    "write_audio",
    "write_checksums",
    "write_error_reason",
    "write_video",
]
