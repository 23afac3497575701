"""Avatar assets (portrait + landmarks, optional idle loop video)."""

from avatars.model import DEFAULT_AVATAR_DIR, Avatar, AvatarError, load_avatar_dir

__all__ = ["DEFAULT_AVATAR_DIR", "Avatar", "AvatarError", "load_avatar_dir"]
