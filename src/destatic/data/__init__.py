"""Datasets built locally from Debian packages (nothing is downloaded at run time)."""

from destatic.data.emoji import EmojiDataset, build_emoji, load_emoji

__all__ = ["EmojiDataset", "build_emoji", "load_emoji"]
from destatic.data.folder import CaptionedImages, load_image_folder

__all__ += ["CaptionedImages", "load_image_folder"]
