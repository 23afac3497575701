"""Avatars as data: the built-in one, registration of your own (decode, face analysis, quality
checks, idle loop, crops) and the registry on disk. Loading one for a call is ``face.library``."""

from avatars.model import DEFAULT_AVATAR_DIR, Avatar, AvatarError, load_avatar_dir

__all__ = ["DEFAULT_AVATAR_DIR", "Avatar", "AvatarError", "load_avatar_dir"]
