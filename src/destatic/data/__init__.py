"""Datasets built locally from Debian packages (nothing is downloaded at run time)."""

from destatic.data.audio import AudioClips
from destatic.data.audio_folder import load_audio_folder
from destatic.data.clipart import ClipartDataset, build_clipart, load_clipart
from destatic.data.emoji import EmojiDataset, build_emoji, load_emoji
from destatic.data.folder import CaptionedImages, load_image_folder
from destatic.data.motion import MOTIONS, MotionClips, motion_of
from destatic.data.notes import load_notes
from destatic.data.sound_effects import load_sound_effects
from destatic.data.speech import load_speech
from destatic.data.video_folder import CaptionedVideos, load_video_folder

__all__ = [
    "MOTIONS",
    "AudioClips",
    "CaptionedImages",
    "CaptionedVideos",
    "ClipartDataset",
    "EmojiDataset",
    "MotionClips",
    "build_clipart",
    "build_emoji",
    "load_audio_folder",
    "load_clipart",
    "load_emoji",
    "load_image_folder",
    "load_notes",
    "load_sound_effects",
    "load_speech",
    "load_video_folder",
    "motion_of",
]
