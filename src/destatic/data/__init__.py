"""Datasets built locally from Debian packages (nothing is downloaded at run time)."""

from destatic.data.clipart import ClipartDataset, build_clipart, load_clipart
from destatic.data.emoji import EmojiDataset, build_emoji, load_emoji
from destatic.data.folder import CaptionedImages, load_image_folder
from destatic.data.motion import MOTIONS, MotionClips, motion_of
from destatic.data.video_folder import CaptionedVideos, load_video_folder

__all__ = [
    "MOTIONS",
    "CaptionedImages",
    "CaptionedVideos",
    "ClipartDataset",
    "EmojiDataset",
    "MotionClips",
    "build_clipart",
    "build_emoji",
    "load_clipart",
    "load_emoji",
    "load_image_folder",
    "load_video_folder",
    "motion_of",
]
