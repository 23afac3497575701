"""The pipeline a call and a render share: speech synthesis (bounded units, fair scheduling),
lip-sync engines, VAD, speech to text, the replier, and rendered clips with their jobs."""

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
