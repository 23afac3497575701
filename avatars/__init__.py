"""Avatars: the built-in one, registration of your own (decode, face analysis, quality checks,
idle loop, crops), the registry on disk, and the library of loaded avatars calls use."""

from avatars.model import DEFAULT_AVATAR_DIR, Avatar, AvatarError, load_avatar_dir

__all__ = ["DEFAULT_AVATAR_DIR", "Avatar", "AvatarError", "load_avatar_dir"]
