"""What the avatar says back: the ``Replier`` interface (``base``), an OpenAI-compatible chat
client (``openai_client``) and the embedded offline persona (``persona``)."""

from pipeline.replier.base import LANGUAGE_NAMES, Message, Replier, ReplyError, trim_history
from pipeline.replier.openai_client import OpenAIReplier
from pipeline.replier.persona import EmbeddedReplier

__all__ = [
    "LANGUAGE_NAMES",
    "EmbeddedReplier",
    "Message",
    "OpenAIReplier",
    "Replier",
    "ReplyError",
    "trim_history",
]
