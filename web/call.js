// Browser side of an avatar call: one RTCPeerConnection to the server (POST /offer, no
// trickle ICE), a "control" data channel, an avatar picker (GET /avatars; ?avatar=ID
// preselects one), a live stats panel, and a small test hook on window.avatarCall. Plain JS,
// no build step. When the server wants a token for calls (access.offer_token), open the page
// as /?token=TOKEN (or /#token=TOKEN, which never reaches any log): it is sent with the offer
// as "Authorization: Bearer TOKEN".
"use strict";

(() => {
  const ICE_GATHER_TIMEOUT_MS = 3000;
  const OFFER_TIMEOUT_MS = 15000;
  const MAX_EVENTS = 500;
  const RECORDER_MIME = "video/webm;codecs=vp8,opus";

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    video: $("remote"),
    start: $("start"),
    stop: $("stop"),
    mic: $("mic"),
    sayForm: $("say-form"),
    sayText: $("say-text"),
    say: $("say"),
    hush: $("hush"),
    chatForm: $("chat-form"),
    chatText: $("chat-text"),
    chat: $("chat"),
    transcript: $("transcript"),
    turnMetrics: $("turn-metrics"),
    replierNote: $("replier-note"),
    errors: $("errors"),
    stats: $("stats"),
    avatarSelect: $("avatar-select"),
    avatarThumb: $("avatar-thumb"),
  };
  const urlAvatar = new URLSearchParams(location.search).get("avatar") || "";
  const offerToken = new URLSearchParams(location.hash.replace(/^#/, "")).get("token") ||
    new URLSearchParams(location.search).get("token") || "";

  // Everything about the current call. `state` is the call's state:
  // "new" | "connecting" | "connected" | "closed" | "failed";
  // `avatarState` is what the server last said: "listening" | "thinking" | "speaking" | null.
  const call = {
    state: "new",
    avatarState: null,
    sessionId: null,
    hello: null,
    lastEvents: [],
    pc: null,
    dc: null,
    micTrack: null,
    remoteStream: null,
    statsTimer: null,
    prevStats: null,
    lastStats: {},
    recorder: null,
    avatars: null, // the list from GET /avatars, once loaded
    avatarId: null, // the avatar of the current (or last) call
  };

  // ---- UI helpers -------------------------------------------------------------------

  function render() {
    const live = call.state === "connecting" || call.state === "connected";
    const open = call.dc !== null && call.dc.readyState === "open";
    ui.start.disabled = live;
    ui.avatarSelect.disabled = live;
    ui.stop.disabled = !live;
    ui.mic.disabled = !live || call.micTrack === null;
    const micOn = call.micTrack !== null && call.micTrack.enabled;
    ui.mic.textContent = micOn ? "Microphone: on" : "Microphone: off";
    ui.mic.setAttribute("aria-pressed", String(micOn));
    ui.sayText.disabled = !open;
    ui.say.disabled = !open;
    ui.hush.disabled = !open;
    ui.chatText.disabled = !open;
    ui.chat.disabled = !open;

    let text = {
      new: "Not connected",
      connecting: "Connecting…",
      connected: "Connected",
      closed: "Call ended",
      failed: "Call failed",
    }[call.state];
    let shown = call.state;
    if (call.state === "connected" && call.avatarState) {
      text = `Connected — ${call.avatarState}`;
      shown = call.avatarState;
    }
    ui.status.textContent = text;
    ui.status.dataset.state = shown;
  }

  function addTranscript(role, text) {
    const line = document.createElement("p");
    line.className = `line ${role === "user" ? "user" : "assistant"}`;
    line.dir = "auto"; // right-to-left for Persian, Arabic, Hebrew text
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Avatar";
    const words = document.createElement("bdi");
    words.textContent = text;
    line.append(who, words);
    ui.transcript.append(line);
    while (ui.transcript.childElementCount > 200) ui.transcript.firstElementChild.remove();
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  function showMetrics(m) {
    const part = (key, label) => (typeof m[key] === "number" ? `${label} ${Math.round(m[key])} ms` : null);
    const parts = [
      part("voice_to_voice_ms", "voice-to-voice"),
      part("stt_ms", "STT"),
      part("llm_first_token_ms", "LLM"),
      part("tts_first_audio_ms", "TTS"),
      part("lipsync_first_frame_ms", "lip-sync"),
    ].filter(Boolean);
    ui.turnMetrics.textContent = parts.length ? `(turn ${m.turn}: ${parts.join(", ")})` : "";
  }

  async function loadHealth() {
    try {
      const response = await fetch("/health", { headers: { Accept: "application/json" } });
      const body = await response.json();
      ui.replierNote.hidden = body.replier !== "embedded";
    } catch (_) { /* the note stays hidden */ }
  }

  function showError(message) {
    const line = document.createElement("p");
    line.textContent = message;
    ui.errors.append(line);
    while (ui.errors.childElementCount > 4) ui.errors.firstElementChild.remove();
    ui.errors.hidden = false;
    console.warn("avatar call:", message);
  }

  function clearErrors() {
    ui.errors.replaceChildren();
    ui.errors.hidden = true;
  }

  function setState(state) {
    call.state = state;
    render();
  }

  // ---- Call setup -------------------------------------------------------------------

  async function openMicrophone() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("This browser cannot capture a microphone here (it needs https or localhost). " +
        "Continuing receive-only.");
      return null;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
      return stream.getAudioTracks()[0] || null;
    } catch (err) {
      const why = err && err.name === "NotAllowedError"
        ? "Microphone permission was denied"
        : err && err.name === "NotFoundError"
          ? "No microphone was found"
          : `The microphone could not be opened (${err && err.name ? err.name : err})`;
      showError(`${why}. Continuing receive-only: you can watch and listen, and type to the avatar.`);
      return null;
    }
  }

  function waitForIceGathering(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  // The STUN/TURN servers the server names (none on a LAN); TURN credentials may be made
  // for this request, so they are fetched for every call. A failure means host candidates only.
  async function iceServers() {
    const headers = { Accept: "application/json" };
    if (offerToken) headers.Authorization = `Bearer ${offerToken}`;
    try {
      const response = await fetch("/ice-servers", { headers, cache: "no-store" });
      if (!response.ok) return [];
      const body = await response.json();
      return Array.isArray(body.iceServers) ? body.iceServers : [];
    } catch (_) {
      return [];
    }
  }

  // POST the offer; returns the answer JSON or throws an Error with a readable message.
  async function postOffer(description) {
    const body = { sdp: description.sdp, type: description.type };
    const avatarId = call.avatarId;
    if (avatarId) body.avatar_id = avatarId;

    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), OFFER_TIMEOUT_MS);
    const headers = { "Content-Type": "application/json" };
    if (offerToken) headers.Authorization = `Bearer ${offerToken}`;
    let response;
    try {
      response = await fetch("/offer", {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        signal: abort.signal,
      });
    } catch (err) {
      throw new Error(err.name === "AbortError"
        ? "The server did not answer the offer in time."
        : `Could not reach the server (${err.message}).`);
    } finally {
      clearTimeout(timer);
    }

    let payload = null;
    try { payload = await response.json(); } catch (_) { /* not JSON */ }
    if (response.ok && payload && payload.sdp) return payload;

    const detail = payload && (payload.detail || payload.error);
    if (response.status === 401) {
      throw new Error(offerToken
        ? "The server did not accept the access token in this page's address. " +
          "Ask for a new link, or check the token after ?token= in the address."
        : "This server only takes calls with an access token. Open the page with " +
          "?token=YOUR_TOKEN at the end of its address (ask whoever runs the server).");
    }
    if (response.status === 403) {
      throw new Error("The server does not allow calls from here" +
        (detail ? `: ${detail}` : "."));
    }
    if (response.status === 429) {
      const retry = response.headers.get("Retry-After");
      throw new Error("Too many calls were started from this address in a short time. " +
        (retry ? `Try again in ${retry} s.` : "Try again in a minute."));
    }
    if (response.status === 503) {
      const retry = response.headers.get("Retry-After");
      throw new Error("The server is full" + (retry ? `: try again in ${retry} s.` : ".") +
        (detail ? ` (${detail})` : ""));
    }
    if (response.status === 404) {
      throw new Error(`Unknown avatar${avatarId ? ` "${avatarId}"` : ""}` +
        (detail ? `: ${detail}` : "."));
    }
    throw new Error(`The server refused the call (HTTP ${response.status})` +
      (detail ? `: ${detail}` : "."));
  }

  function onMessage(event) {
    let msg;
    try { msg = JSON.parse(event.data); } catch (_) { return; }
    call.lastEvents.push(msg);
    if (call.lastEvents.length > MAX_EVENTS) call.lastEvents.shift();

    if (msg.type === "hello") {
      call.hello = msg;
      if (msg.session_id) call.sessionId = msg.session_id;
      if (!call.avatarState) call.avatarState = "listening"; // a new session starts listening
    } else if (msg.type === "state") {
      call.avatarState = msg.state;
    } else if (msg.type === "transcript") {
      addTranscript(msg.role, msg.text);
    } else if (msg.type === "metrics") {
      showMetrics(msg);
    } else if (msg.type === "closing") {
      // the server ends the call (call length, idle, shutdown): a normal end, not a failure
      call.closingReason = msg.reason || "closing";
      showError(`The call is ending: ${msg.detail || msg.reason}`);
    } else if (msg.type === "error") {
      showError(`Server: ${msg.message}`);
      if (msg.fatal) {
        stop({ failed: true });
        return;
      }
    }
    render();
  }

  function watchConnection(pc) {
    const failed = (what) => {
      if (pc !== call.pc) return;
      if (call.closingReason) { stop(); return; }
      showError(`The connection failed (${what}): no network path to the server. ` +
        "Check firewalls/VPNs and try again.");
      stop({ failed: true });
    };
    pc.addEventListener("iceconnectionstatechange", () => {
      if (pc.iceConnectionState === "failed") failed("ICE");
    });
    pc.addEventListener("connectionstatechange", () => {
      if (pc !== call.pc) return;
      if (pc.connectionState === "connected") setState("connected");
      else if (pc.connectionState === "failed") failed("connection");
      else if (pc.connectionState === "disconnected") ui.status.textContent = "Reconnecting…";
    });
  }

  async function start() {
    if (call.state === "connecting" || call.state === "connected") return call.sessionId;
    clearErrors();
    Object.assign(call, {
      avatarState: null, sessionId: null, hello: null, lastEvents: [], closingReason: null,
    });
    call.avatarId = ui.avatarSelect.value || null; // null: the server's default
    setState("connecting");

    const pc = new RTCPeerConnection({ iceServers: await iceServers() });
    call.pc = pc;
    call.remoteStream = new MediaStream();
    ui.video.srcObject = call.remoteStream;
    watchConnection(pc);
    pc.addEventListener("track", (event) => {
      call.remoteStream.addTrack(event.track);
      ui.video.play().catch(() => { /* autoplay policy: the user can press play */ });
    });

    try {
      const mic = await openMicrophone();
      if (pc !== call.pc) { // stopped while the permission prompt was up
        if (mic) mic.stop();
        return null;
      }
      call.micTrack = mic;
      pc.addTransceiver("video", { direction: "recvonly" });
      if (mic) {
        pc.addTransceiver(mic, { direction: "sendrecv" });
      } else {
        pc.addTransceiver("audio", { direction: "sendrecv" });
      }

      const dc = pc.createDataChannel("control", { ordered: true });
      call.dc = dc;
      dc.addEventListener("open", render);
      dc.addEventListener("close", render);
      dc.addEventListener("message", onMessage);

      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc);
      const answer = await postOffer(pc.localDescription);
      if (pc !== call.pc) return null;
      call.sessionId = answer.session_id || call.sessionId;
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    } catch (err) {
      if (pc === call.pc) {
        showError(err.message || String(err));
        stop({ failed: true });
      }
      throw err;
    }

    call.prevStats = null;
    call.statsTimer = setInterval(updateStats, 1000);
    render();
    return call.sessionId;
  }

  function stop({ failed = false } = {}) {
    const { pc } = call;  // closing it ends the session on the server (DTLS close)
    if (call.recorder && call.recorder.state !== "inactive") call.recorder.stop();
    clearInterval(call.statsTimer);
    call.statsTimer = null;
    if (call.dc) call.dc.close();
    if (pc) pc.close();
    if (call.micTrack) call.micTrack.stop();
    Object.assign(call, { pc: null, dc: null, micTrack: null });
    ui.video.srcObject = null;
    if (failed) setState("failed");
    else if (pc) setState("closed");
  }

  function send(obj) {
    if (!call.dc || call.dc.readyState !== "open") {
      throw new Error("The call is not connected.");
    }
    call.dc.send(JSON.stringify(obj));
  }

  // ---- Stats ------------------------------------------------------------------------

  const ms = (seconds) => (seconds == null ? null : Math.round(seconds * 10000) / 10);

  // Playout delay over the last interval if possible, else the running average (ms).
  function playoutDelayMs(now, prev) {
    if (!now || now.jitterBufferEmittedCount == null) return null;
    const count = now.jitterBufferEmittedCount - (prev ? prev.jitterBufferEmittedCount : 0);
    const delay = now.jitterBufferDelay - (prev ? prev.jitterBufferDelay : 0);
    if (count > 0) return ms(delay / count);
    return now.jitterBufferEmittedCount > 0
      ? ms(now.jitterBufferDelay / now.jitterBufferEmittedCount) : null;
  }

  async function collectStats() {
    const report = await call.pc.getStats();
    let video = null;
    let audio = null;
    let pair = null;
    let selectedPairId = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") video = s;
      else if (s.type === "inbound-rtp" && s.kind === "audio") audio = s;
      else if (s.type === "transport" && s.selectedCandidatePairId) {
        selectedPairId = s.selectedCandidatePairId;
      }
    });
    report.forEach((s) => {
      if (s.type !== "candidate-pair") return;
      if (s.id === selectedPairId || (!selectedPairId && s.nominated && s.state === "succeeded")) {
        pair = s;
      }
    });

    const prev = call.prevStats;
    const now = performance.now();
    let fps = video && video.framesPerSecond != null ? video.framesPerSecond : null;
    if (fps == null && video && prev && prev.video) {
      fps = (video.framesDecoded - prev.video.framesDecoded) / ((now - prev.at) / 1000);
    }
    call.prevStats = { at: now, video, audio };
    return {
      fps: fps == null ? null : Math.round(fps * 10) / 10,
      frameWidth: video ? video.frameWidth || null : null,
      frameHeight: video ? video.frameHeight || null : null,
      framesDecoded: video ? video.framesDecoded : null,
      rttMs: pair ? ms(pair.currentRoundTripTime) : null,
      audioJitterMs: audio ? ms(audio.jitter) : null,
      audioPlayoutDelayMs: playoutDelayMs(audio, prev && prev.audio),
      videoPlayoutDelayMs: playoutDelayMs(video, prev && prev.video),
      audioPacketsLost: audio ? audio.packetsLost : null,
      videoPacketsLost: video ? video.packetsLost : null,
    };
  }

  function showStats(s) {
    const fmt = (v, unit = "") => (v == null ? "–" : `${v}${unit}`);
    const cells = {
      fps: fmt(s.fps),
      frameSize: s.frameWidth ? `${s.frameWidth} × ${s.frameHeight}` : "–",
      framesDecoded: fmt(s.framesDecoded),
      rtt: fmt(s.rttMs, " ms"),
      audioJitter: fmt(s.audioJitterMs, " ms"),
      audioPlayoutDelay: fmt(s.audioPlayoutDelayMs, " ms"),
      videoPlayoutDelay: fmt(s.videoPlayoutDelayMs, " ms"),
      packetsLost: `${fmt(s.audioPacketsLost)} / ${fmt(s.videoPacketsLost)}`,
      session: call.sessionId ? call.sessionId.slice(0, 8) : "–",
    };
    for (const [key, text] of Object.entries(cells)) {
      ui.stats.querySelector(`[data-stat="${key}"]`).textContent = text;
    }
    ui.stats.querySelector('[data-stat="session"]').title = call.sessionId || "";
  }

  async function updateStats() {
    if (!call.pc) return;
    try {
      call.lastStats = await collectStats();
      showStats(call.lastStats);
    } catch (err) {
      console.warn("getStats failed", err);
    }
  }

  // ---- Recording the remote stream (what the user sees and hears) ---------------------

  function startRecording(mimeType = RECORDER_MIME) {
    if (!call.remoteStream || call.remoteStream.getTracks().length === 0) {
      throw new Error("Nothing to record: no remote stream.");
    }
    if (call.recorder && call.recorder.state !== "inactive") {
      throw new Error("Already recording.");
    }
    const recorder = new MediaRecorder(call.remoteStream, { mimeType });
    const chunks = [];
    recorder.addEventListener("dataavailable", (e) => { if (e.data.size) chunks.push(e.data); });
    recorder.done = new Promise((resolve, reject) => {
      recorder.addEventListener("stop", () => resolve(new Blob(chunks, { type: mimeType })));
      recorder.addEventListener("error", (e) => reject(e.error || new Error("recorder error")));
    });
    recorder.start(500);
    call.recorder = recorder;
  }

  function blobToBase64(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const url = String(reader.result); // data:<mime, which has commas>;base64,<data>
        resolve(url.slice(url.indexOf(";base64,") + ";base64,".length));
      };
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  // Resolves with the recording as base64 webm.
  async function stopRecording() {
    const recorder = call.recorder;
    if (!recorder) throw new Error("Not recording.");
    call.recorder = null;
    if (recorder.state !== "inactive") recorder.stop();
    return blobToBase64(await recorder.done);
  }

  async function record(durationMs, mimeType = RECORDER_MIME) {
    startRecording(mimeType);
    await new Promise((resolve) => setTimeout(resolve, durationMs));
    return stopRecording();
  }

  // ---- The avatar picker ------------------------------------------------------------

  const thumbnailUrl = (id) => `/avatars/${encodeURIComponent(id)}/thumbnail`;

  function avatarOption(value, text, title) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    if (title) option.title = title;
    return option;
  }

  // Show the chosen avatar's thumbnail beside the picker and on the idle video.
  function showChosenAvatar() {
    const id = ui.avatarSelect.value;
    const known = id && call.avatars && call.avatars.some((a) => a.id === id);
    if (known) {
      ui.avatarThumb.src = thumbnailUrl(id);
      ui.avatarThumb.hidden = false;
      ui.video.poster = thumbnailUrl(id);
    } else {
      ui.avatarThumb.hidden = true;
      ui.avatarThumb.removeAttribute("src");
      ui.video.removeAttribute("poster");
    }
  }

  function selectAvatar(id) {
    if (call.state === "connecting" || call.state === "connected") {
      throw new Error("The avatar cannot change during a call.");
    }
    const value = id || "";
    if (![...ui.avatarSelect.options].some((o) => o.value === value)) {
      ui.avatarSelect.append(avatarOption(value, `${value} (not registered)`));
    }
    ui.avatarSelect.value = value;
    onAvatarChosen();
  }

  function onAvatarChosen() {
    showChosenAvatar();
    // keep the choice in the address, so a reload or a shared link calls the same avatar
    const url = new URL(location.href);
    if (ui.avatarSelect.value) url.searchParams.set("avatar", ui.avatarSelect.value);
    else url.searchParams.delete("avatar");
    history.replaceState(history.state, "", url);
  }

  async function loadAvatars() {
    let avatars;
    try {
      const response = await fetch("/avatars", { headers: { Accept: "application/json" } });
      const body = await response.json();
      if (!response.ok || !body || !Array.isArray(body.avatars)) {
        throw new Error(`HTTP ${response.status}`);
      }
      avatars = body.avatars;
    } catch (err) {
      console.warn("avatar call: could not list the avatars", err);
      return null; // keep the picker as it is: the URL's avatar or the server's default
    }
    call.avatars = avatars;
    const wanted = ui.avatarSelect.value || urlAvatar || "default";
    const names = new Map();
    for (const a of avatars) names.set(a.name, (names.get(a.name) || 0) + 1);
    const options = avatars.map((a) => {
      const name = a.name || a.id;
      return avatarOption(a.id, names.get(a.name) > 1 ? `${name} (${a.id})` : name, a.id);
    });
    if (!avatars.some((a) => a.id === wanted)) {
      options.unshift(wanted === "default"
        ? avatarOption("", "Default avatar")
        : avatarOption(wanted, `${wanted} (not registered)`));
    }
    ui.avatarSelect.replaceChildren(...options);
    ui.avatarSelect.value = wanted === "default" && !avatars.some((a) => a.id === wanted)
      ? "" : wanted;
    showChosenAvatar();
    return avatars;
  }

  // ---- Wiring -----------------------------------------------------------------------

  ui.start.addEventListener("click", () => { start().catch(() => { /* shown already */ }); });
  ui.stop.addEventListener("click", () => stop());
  ui.mic.addEventListener("click", () => {
    if (!call.micTrack) return;
    call.micTrack.enabled = !call.micTrack.enabled;
    render();
  });
  ui.sayForm.addEventListener("submit", (event) => {
    event.preventDefault(); // Enter in the text box submits the form too
    const text = ui.sayText.value.trim();
    if (!text) return;
    try {
      send({ type: "say", text });
      ui.sayText.value = "";
    } catch (err) {
      showError(err.message);
    }
  });
  ui.hush.addEventListener("click", () => {
    try {
      send({ type: "interrupt" });
    } catch (err) {
      showError(err.message);
    }
  });
  ui.chatForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.chatText.value.trim();
    if (!text) return;
    try {
      send({ type: "chat", text });
      ui.chatText.value = "";
    } catch (err) {
      showError(err.message);
    }
  });
  ui.avatarSelect.addEventListener("change", onAvatarChosen);
  ui.avatarThumb.addEventListener("error", () => { ui.avatarThumb.hidden = true; });
  window.addEventListener("pagehide", () => { if (call.pc) stop(); });
  if (urlAvatar) {
    ui.avatarSelect.replaceChildren(avatarOption(urlAvatar, urlAvatar));
    ui.avatarSelect.value = urlAvatar;
  }
  const avatarsLoaded = loadAvatars();
  loadHealth();
  render();

  window.avatarCall = {
    start,
    stop: () => stop(),
    send,
    get state() { return call.state; },
    get avatarState() { return call.avatarState; },
    get sessionId() { return call.sessionId; },
    get hasToken() { return offerToken !== ""; },
    get pc() { return call.pc; },
    get hello() { return call.hello; },
    get lastEvents() { return call.lastEvents; },
    get micEnabled() { return call.micTrack !== null && call.micTrack.enabled; },
    // the avatar picked for the next call (null: the server's default) and, in a call, its own
    get avatarId() {
      const live = call.state === "connecting" || call.state === "connected";
      return live ? call.avatarId : ui.avatarSelect.value || null;
    },
    get avatars() { return call.avatars; },
    avatarsLoaded,
    selectAvatar,
    statsSnapshot: () => ({ ...call.lastStats }),
    record,
    startRecording,
    stopRecording,
  };
})();
