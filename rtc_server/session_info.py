"""What ``GET /sessions`` shows of one call: its counters, recent rates, render pipeline,
lip-sync engine (and whether it is degraded for missed deadlines) and microphone."""

from __future__ import annotations

import time
from typing import Any


def describe_session(s: Any) -> dict[str, object]:
    """``s``: a ``rtc_server.session.Session`` (not imported: the session imports this)."""
    return {
        "id": s.id,
        "state": s.state,
        "avatar_id": s.avatar.avatar_id,
        "uptime_s": round(time.monotonic() - s.created_monotonic, 3),
        "frames_sent": {
            "video": s.video_track.stats.frames_sent,
            "audio": s.audio_track.stats.frames_sent,
        },
        # the last two seconds: what a receiver got, frames a second and the longest wait
        "recent": {
            "audio_fps": round(s.audio_track.recent_fps(), 1),
            "audio_max_gap_ms": round(s.audio_track.recent_max_gap_ms(), 1),
            "video_fps": round(s.video_track.recent_fps(), 1),
            "video_max_gap_ms": round(s.video_track.recent_max_gap_ms(), 1),
        },
        "frames_repeated": s.video_track.stats.frames_repeated,
        "frames_skipped": s.video_track.stats.frames_skipped,
        "frames_shed": s.video_track.stats.frames_shed,
        "frames_late": s.frames.stats.late,
        "render": {
            "rendered": s.frames.stats.rendered,
            "skipped": s.frames.stats.skipped,
            "rerendered": s.frames.stats.rerendered,
            "window": s.frames.stats.window,
            "frame_ms": s.frames.stats.frame_ms,
        },
        "video_codec": s.video_codec,
        "lipsync": s.lipsync.name,
        "lipsync_degraded": s.lipsync.degraded,
        "speaking": s.compositor.speaking,
        "mic": {
            "frames_received": s.mic.frames_received,
            "rms_dbfs": round(s.mic.rms_dbfs, 1),
            "frames_dropped": s.conversation.mic_frames_dropped,
            # where its packets are decoded: the call's mic thread (rtc_server.mic), or
            # aiortc's decoder (a call that does not listen)
            "decoder": "mic-thread" if s.mic.tapped else "aiortc",
            # time the caller's Opus DTX left out, heard as silence (webrtc.opus_dtx)
            "dtx_silence_ms": s.mic.silence_ms,
            # quiet chunks counted as silence without the VAD model (vad.skip_quiet)
            "vad_chunks_skipped": getattr(s.conversation.end_of_turn.listener,
                                          "skipped_chunks", 0),
        },
        # turns ended too soon: the person went on within the fixed silence (issue 24)
        "early_cut_ins": s.conversation.early_cut_ins,
    }
