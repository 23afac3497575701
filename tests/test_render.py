"""The render core: text or audio -> MP4/WebM, OGG, WAV and the animation timeline, with the
real Piper voice, the viseme engine and the default avatar at a low resolution."""

from __future__ import annotations

import itertools
import json
import math
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from common.errors import BadRequest, NotFound
from config import load_settings
from face import IdleTimeline
from pipeline.lipsync.base import VISEMES
from pipeline.lipsync.visemes import MouthCue
from pipeline.render.core import ClipRenderer, RenderCancelled, split_points
from pipeline.render.media import change_tempo, decode_audio
from pipeline.render.spec import RenderSpec
from pipeline.render.timeline import direction_of, eye_events, idle_seed, mouth_cues
from tests.fakes.speech import piper_speech, silence, speech_bounds, write_wav

SIZE = 192
FPS = 25
SR = 48000
FRAME_S = 1 / FPS
KEY = "ab" * 32
SAY_A = "Hello there, how are you today?"
SAY_B = "Father saw a large car."


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return load_settings(
        env={},
        overrides={
            "media.video_width": SIZE,
            "media.video_height": SIZE,
            "avatars.data_dir": str(tmp_path_factory.mktemp("data")),
            "lipsync.engine": "viseme",
            "render.max_audio_s": 30,
            # near-lossless H.264, so frames of two clips compare with little codec noise
            "render.h264_crf": 12,
        },
    )


@pytest.fixture(scope="module")
def renderer(settings):
    r = ClipRenderer.from_settings(settings)
    yield r
    r.close()


def spec(*, text=None, audio=None, fmt="mp4", key=KEY, voice="default", speed=1.0, fps=FPS,
         avatar="default"):
    return RenderSpec(
        avatar_id=avatar,
        text=text,
        audio_path=None if audio is None else str(audio),
        voice=voice,
        speed=speed,
        format=fmt,
        fps=fps,
        cache_key=key,
    )


class Events:
    """A progress callback recording (percent, stage)."""

    def __init__(self):
        self.seen: list[tuple[float, str]] = []

    def __call__(self, percent, stage):
        self.seen.append((percent, stage))


def render(renderer, s, out: Path, progress=None, cancel=None):
    out.mkdir(parents=True, exist_ok=True)
    return renderer.render(s, out, progress or Events(), cancel or threading.Event())


def read_wav(path: Path) -> np.ndarray:
    import wave

    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == SR
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def video_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]


def audio_samples(path: Path) -> tuple[str, int, int]:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate = stream.codec_context.sample_rate
        return stream.codec_context.name, sum(f.samples for f in c.decode(audio=0)), rate


@pytest.fixture(scope="module")
def two_phrases(tmp_path_factory):
    """Speech A, 1 s of digital silence, speech B, as a 16 kHz WAV; and the phrase bounds
    in seconds from the start of the file."""
    a, b = piper_speech(SAY_A), piper_speech(SAY_B)
    gap = silence(1.0)
    audio = np.concatenate([a, gap, b])
    path = write_wav(tmp_path_factory.mktemp("wav") / "two.wav", audio)
    a_on, a_end = speech_bounds(a)
    b_on, b_end = speech_bounds(b)
    b0 = (len(a) + len(gap)) / 16000
    return path, audio, (a_on, a_end), (b0 + b_on, b0 + b_end), (len(a) / 16000, b0)


@pytest.fixture(scope="module")
def two_phrases_clip(renderer, two_phrases, tmp_path_factory):
    path = two_phrases[0]
    out = tmp_path_factory.mktemp("clip")
    manifest = render(renderer, spec(audio=path), out)
    return manifest, out


# ------------------------------------------------------------------------------ text -> mp4


def test_text_to_mp4_decodes_with_video_as_long_as_the_audio(renderer, tmp_path):
    events = Events()
    m = render(renderer, spec(text=SAY_A + " " + SAY_B), tmp_path, events)
    assert m["format"] == "mp4" and m["engine"] == "viseme" and m["voice"] == "default"
    assert (m["width"], m["height"], m["fps"]) == (SIZE, SIZE, FPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audio.ogg", "audio.wav", "timeline.json", "video.mp4"
    ]
    pcm = read_wav(tmp_path / "audio.wav")
    assert len(pcm) == m["audio_samples"] and abs(m["duration_s"] - len(pcm) / SR) < 1e-3
    assert np.sqrt(np.mean((pcm / 32768.0) ** 2)) > 0.01  # speech, not silence
    expected_frames = math.ceil(len(pcm) * FPS / SR)
    assert m["frames"] == expected_frames

    with av.open(str(tmp_path / "video.mp4")) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert (v.codec_context.width, v.codec_context.height) == (SIZE, SIZE)
        n_video = sum(1 for _ in c.decode(video=0))
    assert n_video == expected_frames
    codec, n_audio, rate = audio_samples(tmp_path / "video.mp4")
    video_s, audio_s = n_video / FPS, n_audio / rate
    assert abs(video_s - len(pcm) / SR) <= FRAME_S
    assert abs(audio_s - len(pcm) / SR) <= FRAME_S
    assert abs(video_s - audio_s) <= FRAME_S

    stages = [s for _, s in events.seen]
    assert stages[0] == "synthesising" and events.seen[-1][0] == 100.0
    order = ["synthesising", "analysing", "rendering", "encoding", "finishing"]
    assert [s for s in order if s in stages] == order
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    percents = [p for p, _ in events.seen]
    assert percents == sorted(percents)
    assert sum(1 for s in stages if s == "rendering") >= 20  # grows with the frames

    # phoneme cues of the synthesised speech lie inside the audible speech
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert timeline["fps"] == FPS and timeline["sample_rate"] == SR
    assert timeline["duration_ms"] == round(len(pcm) * 1000 / SR)
    on, end = speech_bounds(pcm.astype(np.float32) / 32768.0, SR, level=0.003)
    spoken = [c for c in timeline["mouth_cues"] if c["viseme"] != "REST"]
    assert spoken
    assert all(on - FRAME_S <= c["t_ms"] / 1000 <= end + FRAME_S for c in spoken)
    assert abs(spoken[0]["t_ms"] / 1000 - on) <= 2 * FRAME_S


# ------------------------------------------------------------------------------ mouth motion


def mouth_box(renderer):
    lm = renderer.library.get("default").avatar.landmarks[48:68]
    (x0, y0), (x1, y1) = lm.min(axis=0), lm.max(axis=0)
    mx, my = 0.3 * (x1 - x0), 0.5 * (y1 - y0)
    return (slice(int(y0 - my), int(math.ceil(y1 + my))),
            slice(int(x0 - mx), int(math.ceil(x1 + mx))))


def motion(frames, box, ks):
    """Mean absolute change of the mouth region from frame k-1 to frame k, per k."""
    return np.array([np.abs(frames[k][box] - frames[k - 1][box]).mean() for k in ks])


def test_mouth_moves_while_speech_plays_and_holds_still_in_silence(
    renderer, two_phrases, two_phrases_clip, tmp_path
):
    path, audio, (a_on, a_end), (b_on, b_end), (gap0, gap1) = two_phrases
    m, out = two_phrases_clip
    # the same clip without the speech: same length, same key (same idle motion)
    quiet = write_wav(tmp_path / "quiet.wav", np.zeros_like(audio))
    ref_out = tmp_path / "ref"
    ref = render(renderer, spec(audio=quiet), ref_out)
    assert ref["frames"] == m["frames"]

    frames = video_frames(out / "video.mp4")
    idle = video_frames(ref_out / "video.mp4")
    box = mouth_box(renderer)

    def frames_in(t0, t1):
        return list(range(max(1, math.ceil(t0 * FPS)), min(len(frames), int(t1 * FPS))))

    speaking = frames_in(a_on + 0.1, a_end - 0.1) + frames_in(b_on + 0.1, b_end - 0.1)
    quiet_gap = frames_in(gap0 + 0.25, gap1 - 0.25)
    assert len(speaking) > 20 and len(quiet_gap) > 10

    idle_motion = motion(idle, box, speaking).mean()
    speech_motion = motion(frames, box, speaking).mean()
    gap_motion = motion(frames, box, quiet_gap).mean()
    # speech moves the mouth far more than breathing and head sway do (Piper's voice is not
    # the same twice: over six runs speech moved it 3.05-4.11 against 0.47-0.52 idle)
    assert speech_motion > 3 * idle_motion + 1.0, (speech_motion, idle_motion)
    # in the silence the mouth moves no more than the idle face around it
    assert gap_motion < idle_motion + 0.5, (gap_motion, idle_motion)
    # ... and looks like the idle clip's mouth at rest, frame for frame (up to codec noise)
    def differ(ks):
        return np.mean([np.abs(frames[k][box] - idle[k][box]).mean() for k in ks])

    assert differ(quiet_gap) < 2.5 and differ(quiet_gap) < 0.25 * differ(speaking), (
        differ(quiet_gap), differ(speaking))
    # in the silence the whole face outside the mouth follows the same idle motion (same
    # seed); while it speaks the head also follows the voice's stress (issue 23)
    top = (slice(0, box[0].start - 10), slice(None))

    def top_differs(ks):
        return np.mean([np.abs(frames[k][top] - idle[k][top]).mean() for k in ks])

    assert top_differs(quiet_gap) < 2.0
    assert top_differs(speaking) > top_differs(quiet_gap) + 1.0


# ------------------------------------------------------------------------------ timeline


def test_timeline_cues_follow_the_audio(two_phrases, two_phrases_clip):
    _, _, (a_on, a_end), (b_on, b_end), (gap0, gap1) = two_phrases
    m, out = two_phrases_clip
    timeline = json.loads((out / "timeline.json").read_text())
    cues = timeline["mouth_cues"]
    assert cues[0]["t_ms"] == 0
    assert all(c["viseme"] in VISEMES and 0.0 <= c["weight"] <= 1.0 for c in cues)
    times = [c["t_ms"] for c in cues]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(x["viseme"] != y["viseme"] for x, y in itertools.pairwise(cues))  # one per change

    spoken = [c for c in cues if c["viseme"] != "REST"]
    in_a = [c for c in spoken if c["t_ms"] / 1000 < gap1 - 0.5]
    in_b = [c for c in spoken if c["t_ms"] / 1000 >= gap1 - 0.5]
    assert len(in_a) > 3 and len(in_b) > 3
    for c in in_a:
        assert a_on - FRAME_S <= c["t_ms"] / 1000 <= a_end + FRAME_S, c
    for c in in_b:
        assert b_on - FRAME_S <= c["t_ms"] / 1000 <= b_end + FRAME_S, c
    assert abs(in_a[0]["t_ms"] / 1000 - a_on) <= 2 * FRAME_S
    assert abs(in_b[0]["t_ms"] / 1000 - b_on) <= 2 * FRAME_S
    # the silent gap is covered by one REST cue
    rest = [c for c in cues if c["t_ms"] / 1000 <= gap0 + FRAME_S][-1]
    assert rest["viseme"] == "REST"
    after = cues[cues.index(rest) + 1]
    assert after["t_ms"] / 1000 >= gap1 - FRAME_S
    # both are rounded from the same sample count (to 1 ms and to 3 decimals of a second)
    assert abs(timeline["duration_ms"] - m["duration_s"] * 1000) <= 1


def test_same_spec_gives_the_same_timeline_and_another_key_other_eyes(
    renderer, two_phrases, two_phrases_clip, tmp_path
):
    _, first = two_phrases_clip
    again = render(renderer, spec(audio=two_phrases[0]), tmp_path / "again")
    assert again["frames"] == two_phrases_clip[0]["frames"]
    assert (tmp_path / "again" / "timeline.json").read_bytes() == (
        first / "timeline.json"
    ).read_bytes()
    # eye events depend on the key alone: over a minute they differ between keys
    a = eye_events(IdleTimeline(seed=idle_seed(KEY)), duration_ns=60 * 10**9)
    b = eye_events(IdleTimeline(seed=idle_seed(KEY)), duration_ns=60 * 10**9)
    c = eye_events(IdleTimeline(seed=idle_seed("cd" * 32)), duration_ns=60 * 10**9)
    assert a == b and a != c


def test_eye_events_are_the_idle_timelines_blinks_and_glances():
    idle = IdleTimeline(seed=idle_seed(KEY))
    events = eye_events(idle, duration_ns=60 * 10**9)
    blinks = [e for e in events if e["event_type"] == "blink"]
    glances = [e for e in events if e["event_type"] == "saccade"]
    assert [e["t_ms"] for e in events] == sorted(e["t_ms"] for e in events)
    assert [b["t_ms"] for b in blinks] == [round(t / 1e6) for t in idle.blink_starts_ns(60 * 10**9)]
    gaps = np.diff([b["t_ms"] for b in blinks])
    assert len(blinks) >= 9 and gaps.min() >= 3000 and gaps.max() <= 6000
    assert all(b["direction"] is None and 100 <= b["duration_ms"] <= 150 for b in blinks)
    assert glances
    for g, (start, end, dx, dy) in zip(glances, idle.saccades(60 * 10**9), strict=True):
        assert g["t_ms"] == round(start / 1e6) and g["duration_ms"] == round((end - start) / 1e6)
        assert (g["dx"], g["dy"]) == (round(dx, 3), round(dy, 3))
        assert g["direction"] == direction_of(dx, dy)
        assert ("left" in g["direction"]) == (dx < 0)
        # the blinking and glancing really are in the rendered pose at those times
        mid = (start + end) // 2
        assert idle.pose_at(mid).gaze_x == pytest.approx(dx)
    for b in blinks[:3]:
        t = b["t_ms"] * 10**6 + b["duration_ms"] * 10**6 // 2
        assert idle.pose_at(t).blink > 0.5


def test_direction_names():
    assert direction_of(1, 0) == "right"
    assert direction_of(-1, 0) == "left"
    assert direction_of(0, -1) == "up"
    assert direction_of(0, 1) == "down"
    assert direction_of(0.7, -0.7) == "up-right"
    assert direction_of(-0.6, 0.5) == "down-left"
    assert direction_of(-0.9, 0.2) == "left"


def test_mouth_cues_merge_segments_at_their_offsets():
    seg1 = [MouthCue(0, "REST", 1.0), MouthCue(100, "AA", 0.8), MouthCue(300, "REST", 1.0)]
    seg2 = [MouthCue(0, "REST", 1.0), MouthCue(50, "EE", 0.5), MouthCue(80, "EE", 0.9)]
    cues = mouth_cues([(0, seg1), (SR, seg2)], sample_rate=SR)
    assert cues == [
        {"t_ms": 0, "viseme": "REST", "weight": 1.0},
        {"t_ms": 100, "viseme": "AA", "weight": 0.8},
        {"t_ms": 300, "viseme": "REST", "weight": 1.0},
        {"t_ms": 1050, "viseme": "EE", "weight": 0.9},
    ]


# ------------------------------------------------------------------------------ webm, audio


def test_webm_is_vp9_and_opus_and_the_audio_files_match(renderer, tmp_path):
    m = render(renderer, spec(text="Good morning, everyone.", fmt="webm"), tmp_path)
    assert m["files"]["video"] == "video.webm"
    pcm = read_wav(tmp_path / "audio.wav")
    assert len(pcm) == m["audio_samples"]
    with av.open(str(tmp_path / "video.webm")) as c:
        assert c.format.name.startswith("matroska")
        assert c.streams.video[0].codec_context.name == "vp9"
        assert c.streams.audio[0].codec_context.name == "opus"
        n_video = sum(1 for _ in c.decode(video=0))
    assert n_video == m["frames"] == math.ceil(len(pcm) * FPS / SR)
    codec, n, rate = audio_samples(tmp_path / "video.webm")
    assert abs(n / rate - len(pcm) / SR) <= FRAME_S
    with av.open(str(tmp_path / "audio.ogg")) as c:
        assert c.format.name == "ogg"
    codec, n, rate = audio_samples(tmp_path / "audio.ogg")
    assert codec == "opus" and abs(n / rate - len(pcm) / SR) <= FRAME_S
    # the OGG is the same sound as the WAV (lossy, so compared by level per 100 ms)
    ogg = decode_audio(tmp_path / "audio.ogg", sample_rate=SR, max_seconds=60)
    k = min(len(ogg), len(pcm)) // 4800

    def level(x):
        return np.sqrt(np.mean((x[: k * 4800].reshape(k, 4800) / 32768.0) ** 2, axis=1))

    assert np.corrcoef(level(ogg), level(pcm))[0, 1] > 0.95


# ------------------------------------------------------------------------------ speed


def test_speed_changes_the_speech_rate_of_text_and_of_audio(renderer, two_phrases, tmp_path):
    slow = render(renderer, spec(text=SAY_B, speed=1.0), tmp_path / "t1")
    fast = render(renderer, spec(text=SAY_B, speed=2.0), tmp_path / "t2")
    assert fast["duration_s"] < 0.7 * slow["duration_s"]
    n = len(two_phrases[1]) * SR // 16000
    sped = render(renderer, spec(audio=two_phrases[0], speed=2.0, fmt="webm"), tmp_path / "a2")
    assert abs(sped["audio_samples"] - n / 2) < 0.02 * n
    tone = (np.sin(np.arange(SR) * 2 * np.pi * 200 / SR) * 10000).astype(np.int16)
    for speed in (0.5, 0.8, 1.5):
        out = change_tempo(tone, SR, speed)
        assert len(out) == round(SR / speed)
        # the same pitch, and sound up to the end
        spectrum = np.abs(np.fft.rfft(out.astype(np.float32)))
        assert abs(np.argmax(spectrum) * SR / len(out) - 200) < 5
        assert np.abs(out[-SR // 20 :]).max() > 5000


# ------------------------------------------------------------------------------ cancel, errors


def test_cancel_from_progress_stops_within_a_frame_and_leaves_no_files(renderer, tmp_path):
    cancel = threading.Event()
    frames_seen = []

    def progress(percent, stage):
        if stage == "rendering":
            frames_seen.append(percent)
            if len(frames_seen) == 3:
                cancel.set()

    with pytest.raises(RenderCancelled):
        render(renderer, spec(text=SAY_A), tmp_path, progress, cancel)
    assert len(frames_seen) == 3  # no frame after the one that saw the cancel
    assert list(tmp_path.iterdir()) == []


def test_cancel_before_start_raises_at_once(renderer, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RenderCancelled):
        render(renderer, spec(text=SAY_A), tmp_path, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_bad_requests(renderer, settings, tmp_path):
    text_file = tmp_path / "notes.wav"
    text_file.write_text("this is not audio\n" * 50)
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    cases = [
        (spec(audio=text_file), "audio"),
        (spec(audio=junk), "audio"),
        (spec(audio=tmp_path / "missing.wav"), "gone"),
        (spec(text="Hello.", voice="nobody"), "unknown voice"),
        (spec(text="   "), "empty"),
        (spec(text="Hello.", speed=2.5), "speed"),
        (spec(text="Hello.", fps=500), "fps"),
        (spec(text="Hello.", fmt="gif"), "format"),
    ]
    for i, (s, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(BadRequest) as err:
            render(renderer, s, out)
        assert words in err.value.detail, err.value.detail
        assert list(out.iterdir()) == []
    with pytest.raises(NotFound):
        render(renderer, spec(text="Hello.", avatar="av_000000000000"), tmp_path / "nf")


def test_audio_longer_than_the_limit_is_refused(renderer, tmp_path):
    short = load_settings(env={}, overrides={"render.max_audio_s": 1.0,
                                             "media.video_width": SIZE,
                                             "media.video_height": SIZE})
    strict = ClipRenderer(short, library=renderer.library, lipsync=renderer.lipsync)
    try:
        path = write_wav(tmp_path / "long.wav", np.full(16000 * 2, 0.1, np.float32))
        with pytest.raises(BadRequest, match="longer than"):
            render(strict, spec(audio=path), tmp_path / "out")
    finally:
        strict.close()


# ------------------------------------------------------------------------------ pieces


def test_spec_round_trips_and_refuses_malformed_records():
    s = spec(text="Hi.")
    assert RenderSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    d = s.to_dict()
    for key, value in [("fps", "25"), ("speed", None), ("avatar_id", 3), ("fps", 2.5)]:
        with pytest.raises(BadRequest, match=key):
            RenderSpec.from_dict({**d, key: value})
    with pytest.raises(BadRequest, match="exactly one"):
        RenderSpec.from_dict({**d, "audio_path": "/tmp/x.wav"})


def test_long_audio_is_cut_on_quiet_frame_boundaries():
    rng = np.random.default_rng(1)
    pcm = (rng.standard_normal(SR * 50) * 3000).astype(np.int16)
    quiet = int(18.4 * SR)
    pcm[quiet - 2000 : quiet + 4000] = 0
    cuts = split_points(pcm, SR, FPS, max_s=20.0)
    assert cuts[0] == 0 and cuts[-1] == len(pcm)
    step = SR // FPS
    assert all(c % step == 0 for c in cuts[1:-1])
    assert all(0 < b - a <= 20 * SR for a, b in itertools.pairwise(cuts))
    assert abs(cuts[1] - quiet) <= step
    assert split_points(pcm[: SR * 5], SR, FPS, max_s=20.0) == [0, SR * 5]


# ------------------------------------------------------------------------------ wav2lip


def test_the_wav2lip_engine_renders_clips_through_its_batching_worker(
    settings, renderer, wav2lip_onnx, tmp_path
):
    """Random weights: the mouth is noise, but the seam is the real one (mel windows per
    frame, frames in flight batched by the engine's worker, paste-back)."""
    from pipeline.lipsync.wav2lip import load_wav2lip_engine

    engine = load_wav2lip_engine(
        wav2lip_onnx, cache_dir=tmp_path / "cache", device="cpu", max_batch=8, max_wait_ms=20
    )
    clips = ClipRenderer(settings, library=renderer.library, lipsync=engine)
    try:
        m = render(clips, spec(text=SAY_B, fmt="webm"), tmp_path / "out")
    finally:
        clips.close()
        engine.worker.close()
    assert m["engine"] == "wav2lip"
    assert len(video_frames(tmp_path / "out" / "video.webm")) == m["frames"]
    stats = engine.worker.stats
    assert stats.items == m["frames"] and stats.mean_batch > 1.5  # several frames in flight
    timeline = json.loads((tmp_path / "out" / "timeline.json").read_text())
    assert any(c["viseme"] != "REST" for c in timeline["mouth_cues"])  # visemes all the same


def test_extra_voices_and_speed_for_a_voice_without_rate_control(renderer, settings, tmp_path):
    from tests.fakes.tts import ToneTTS

    tone = ToneTTS(sample_rate=SR)
    clips = ClipRenderer(settings, library=renderer.library, lipsync=renderer.lipsync,
                         voices={"tone": tone})
    try:
        assert clips.voices() == ["default", "tone"]
        normal = render(clips, spec(text="One two three. Four five.", voice="tone"),
                        tmp_path / "1")
        fast = render(clips, spec(text="One two three. Four five.", voice="tone", speed=2.0),
                      tmp_path / "2")
    finally:
        clips.close()
    assert tone.requests == ["One two three. Four five."] * 2
    # atempo on each sentence: half the samples (sentences start on frame boundaries)
    assert abs(fast["audio_samples"] - normal["audio_samples"] / 2) <= 2 * SR // FPS
    assert fast["voice"] == "tone"
