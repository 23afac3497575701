"""The pipeline a call and a render share: speech synthesis (bounded units, fair scheduling),
lip-sync engines, VAD, speech to text, the replier, rendered clips and their jobs, and the
checks every untrusted input passes (``inputs``)."""

from common.errors import AvatarServerError, BadRequest, NotFound, PipelineError, ServerFull
from pipeline.tts import PiperTTS, SpeechAudio, TextToSpeech

__all__ = [
    "AvatarServerError",
    "BadRequest",
    "NotFound",
    "PiperTTS",
    "PipelineError",
    "ServerFull",
    "SpeechAudio",
    "TextToSpeech",
]
