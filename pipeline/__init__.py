"""The media pipeline: speech synthesis and lip-sync (later: VAD, STT, replier, render jobs)."""

from pipeline.errors import AvatarServerError, BadRequest, NotFound, PipelineError, ServerFull
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
