// The avatar registration page: choose (or drop) an image or video, preview it, upload it
// with a progress bar (POST /avatars), show what the server made of it (or why it refused),
// and list the registered avatars with thumbnails and delete buttons. Plain JS, no build
// step; a small test hook on window.avatarRegister. Registering and deleting are admin
// actions: the "API key" field (kept in sessionStorage, so only for this tab) is sent as
// X-API-Key when the server has keys (access.api_keys).
"use strict";

(() => {
  const DELETE_CONFIRM_MS = 4000;
  const API_KEY_STORAGE = "avatarServer.apiKey";

  // Friendly titles for the server's refusal codes (422) — the server's `detail` follows.
  const REFUSAL_TITLES = {
    no_face: "No face found",
    multiple_faces: "More than one face",
    face_too_small: "The face is too small",
    face_turned: "The face is turned away",
    too_blurry: "The picture is too blurry",
    too_dark: "The picture is too dark",
    too_bright: "The picture is too bright",
    video_too_long: "The video is too long",
  };
  const REFUSAL_HINTS = {
    no_face: "Use a photo or video where one face is clearly visible and looks at the camera.",
    multiple_faces: "Crop the picture so that only one person is in it.",
    face_too_small: "Use a closer shot, or crop the picture around the face.",
    face_turned: "Use a picture where the person looks straight at the camera.",
    too_blurry: "Use a sharper picture: hold the camera still and focus on the face.",
    too_dark: "Use a brighter picture, with light on the face.",
    too_bright: "Use a picture that is not overexposed, without strong light on the face.",
    video_too_long: "Trim the video to a few seconds of the person sitting still.",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("register-form"),
    drop: $("drop"),
    file: $("file"),
    preview: $("preview"),
    previewImage: $("preview-image"),
    previewVideo: $("preview-video"),
    previewNote: $("preview-note"),
    fileInfo: $("file-info"),
    name: $("name"),
    apiKey: $("api-key"),
    upload: $("upload"),
    cancel: $("cancel"),
    progress: $("progress"),
    progressBar: $("progress-bar"),
    progressLabel: $("progress-label"),
    result: $("result"),
    refresh: $("refresh"),
    listStatus: $("list-status"),
    list: $("avatar-list"),
  };

  const state = {
    file: null,
    previewUrl: null,
    nameEdited: false, // the user typed a name: choosing another file keeps it
    xhr: null,
    phase: "idle", // "idle" | "uploading" | "analysing" | "done" | "refused" | "failed"
    phases: [],
    analyseTimer: null,
    lastResult: null, // {status, body} of the last upload
    avatars: null, // the last GET /avatars list
  };

  // ---- small helpers ----------------------------------------------------------------

  function apiKey() {
    return ui.apiKey.value.trim();
  }

  function loadApiKey() {
    try {
      ui.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
    } catch (_) { /* storage disabled: the field still works for this page */ }
  }

  function saveApiKey() {
    try {
      if (apiKey()) sessionStorage.setItem(API_KEY_STORAGE, apiKey());
      else sessionStorage.removeItem(API_KEY_STORAGE);
    } catch (_) { /* storage disabled */ }
  }

  // Plain words for an access refusal (401, 403 "forbidden", 429), or null for other answers.
  function accessProblem(status, body, retryAfter, action) {
    const code = body && body.error;
    if (status === 401) {
      return {
        title: "An API key is needed",
        detail: apiKey()
          ? `The server did not take the API key: enter the right one to ${action}.`
          : `This server asks for an API key to ${action}: enter it in the API key field ` +
            "and try again.",
      };
    }
    if (status === 403 && code === "forbidden") {
      return {
        title: "Not allowed",
        detail: apiKey()
          ? "The API key was not accepted: check it (no spaces) and try again."
          : `This server lets you ${action} only from its own machine, or with an API key ` +
            "that its operator sets up.",
      };
    }
    if (status === 429) {
      return {
        title: "Too many requests",
        detail: "Too many avatars were registered or deleted from this address in a short " +
          `time. Try again in ${retryAfter ? `${retryAfter} s` : "a minute"}.`,
      };
    }
    return null;
  }

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value == null) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    node.append(...children.filter((c) => c != null));
    return node;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / (1024 * 1024)).toFixed(1)} MB`;
  }

  function nameFromFile(fileName) {
    const stem = fileName.replace(/\.[^.]*$/, "");
    return stem.replace(/[_\-.]+/g, " ").replace(/\s+/g, " ").trim().slice(0, 80);
  }

  function thumbnailUrl(id) {
    return `/avatars/${encodeURIComponent(id)}/thumbnail`;
  }

  function callUrl(id) {
    return `/?avatar=${encodeURIComponent(id)}`;
  }

  function humanize(key) {
    const words = String(key).replace(/_/g, " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function formatValue(value) {
    if (typeof value === "number") {
      if (Number.isInteger(value)) return String(value);
      return String(Math.abs(value) >= 100 ? Math.round(value) : Math.round(value * 100) / 100);
    }
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (Array.isArray(value)) return value.length ? value.map(formatValue).join(", ") : "none";
    if (value && typeof value === "object") {
      return Object.entries(value).map(([k, v]) => `${humanize(k)} ${formatValue(v)}`).join(", ");
    }
    return value == null ? "–" : String(value);
  }

  // The headline numbers of the server's quality report, as [label, text] pairs; the whole
  // report is shown too, folded away.
  function describeQuality(q) {
    const out = [];
    const num = (v) => typeof v === "number" && Number.isFinite(v);
    const t = q.thresholds && typeof q.thresholds === "object" ? q.thresholds : {};
    if (num(q.face_size_px)) {
      out.push(["Face size", `${Math.round(q.face_size_px)} px` +
        (num(t.min_face_px) ? ` (at least ${t.min_face_px} needed)` : "")]);
    }
    if (num(q.yaw_deg) || num(q.pitch_deg) || num(q.roll_deg)) {
      const deg = (v) => (num(v) ? `${Math.round(v)}°` : "–");
      out.push(["Head pose", `turn ${deg(q.yaw_deg)}, tilt ${deg(q.pitch_deg)}, ` +
        `lean ${deg(q.roll_deg)}`]);
    }
    if (num(q.brightness)) {
      out.push(["Brightness", `${Math.round(q.brightness)} of 255` +
        (num(t.min_brightness) && num(t.max_brightness)
          ? ` (${t.min_brightness}–${t.max_brightness} accepted)` : "")]);
    }
    if (num(q.sharpness)) {
      out.push(["Sharpness", formatValue(q.sharpness) +
        (num(t.min_sharpness) ? ` (at least ${t.min_sharpness} needed)` : "")]);
    }
    if (q.checks && typeof q.checks === "object") {
      const verdicts = Object.entries(q.checks);
      const passed = verdicts.filter(([, v]) => v === "pass").length;
      const failed = verdicts.filter(([, v]) => v === "fail").map(([k]) => humanize(k));
      out.push(["Checks", `${passed} of ${verdicts.length} passed` +
        (failed.length ? `; failed: ${failed.join(", ")}` : "")]);
    }
    if (q.backend) out.push(["Face detector", String(q.backend)]);
    return out;
  }

  function describeMedia(a) {
    const parts = [];
    if (a.frames != null) {
      parts.push(a.frames === 1 ? "still image" : `${a.frames} frames`);
    }
    if (a.frames > 1 && a.fps) parts.push(`${formatValue(a.fps)} fps`);
    if (a.width && a.height) parts.push(`${a.width} × ${a.height}`);
    return parts.join(" · ");
  }

  // ---- choosing a file --------------------------------------------------------------

  function setPhase(phase) {
    state.phase = phase;
    state.phases.push(phase);
    ui.progress.dataset.phase = phase;
    const busy = phase === "uploading" || phase === "analysing";
    ui.upload.disabled = busy || state.file === null;
    ui.cancel.hidden = !busy;
    ui.file.disabled = busy;
    ui.name.disabled = busy;
    ui.drop.classList.toggle("busy", busy);
    if (phase !== "analysing") {
      clearInterval(state.analyseTimer);
      state.analyseTimer = null;
    }
  }

  function chooseFile(file) {
    if (state.phase === "uploading" || state.phase === "analysing") return;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.file = file;
    state.previewUrl = null;
    ui.result.hidden = true;
    ui.progress.hidden = true;
    setPhase("idle");

    ui.previewImage.hidden = true;
    ui.previewVideo.hidden = true;
    ui.previewNote.hidden = true;
    ui.previewImage.onerror = null;
    ui.previewVideo.onerror = null;
    ui.previewImage.removeAttribute("src");
    ui.previewVideo.removeAttribute("src");
    ui.previewVideo.load();

    if (!file) {
      ui.preview.hidden = true;
      ui.fileInfo.hidden = true;
      ui.drop.dataset.state = "empty";
      ui.upload.disabled = true;
      return;
    }

    ui.drop.dataset.state = "chosen";
    ui.fileInfo.textContent = `${file.name} — ${formatBytes(file.size)}` +
      (file.type ? ` — ${file.type}` : "");
    ui.fileInfo.hidden = false;
    if (!state.nameEdited || !ui.name.value.trim()) {
      ui.name.value = nameFromFile(file.name);
      state.nameEdited = false;
    }
    ui.upload.disabled = false;

    state.previewUrl = URL.createObjectURL(file);
    ui.preview.hidden = false;
    const noPreview = () => {
      ui.previewImage.hidden = true;
      ui.previewVideo.hidden = true;
      ui.previewNote.textContent = "This browser cannot show a preview of this file; " +
        "the server will still check it.";
      ui.previewNote.hidden = false;
    };
    if (file.type.startsWith("video/")) {
      ui.previewVideo.onerror = noPreview;
      ui.previewVideo.src = state.previewUrl;
      ui.previewVideo.hidden = false;
    } else {
      ui.previewImage.onerror = noPreview;
      ui.previewImage.src = state.previewUrl;
      ui.previewImage.hidden = false;
    }
  }

  // ---- uploading --------------------------------------------------------------------

  function showProgress(fraction, label) {
    ui.progress.hidden = false;
    if (fraction == null) {
      ui.progressBar.removeAttribute("value"); // an indeterminate bar
    } else {
      ui.progressBar.value = Math.round(fraction * 100);
    }
    ui.progressLabel.textContent = label;
  }

  function startAnalysing() {
    if (state.phase !== "uploading") return;
    setPhase("analysing");
    const began = performance.now();
    const tick = () => {
      const s = Math.floor((performance.now() - began) / 1000);
      showProgress(null, "Analysing… finding the face and preparing the avatar" +
        (s >= 1 ? ` (${s} s)` : ""));
    };
    tick();
    state.analyseTimer = setInterval(tick, 1000);
  }

  function upload() {
    const file = state.file;
    const name = ui.name.value.trim();
    if (!file) return Promise.reject(new Error("No file chosen."));
    if (!name) {
      ui.name.focus();
      showRefusal(null, "A name is needed", "Give the avatar a name.", null);
      return Promise.reject(new Error("No name given."));
    }

    const form = new FormData();
    form.append("name", name);
    form.append("file", file, file.name);

    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      state.xhr = xhr;
      ui.result.hidden = true;
      state.phases = [];
      setPhase("uploading");
      showProgress(0, `Uploading… 0 % of ${formatBytes(file.size)}`);

      xhr.upload.onprogress = (event) => {
        if (state.phase !== "uploading" || !event.lengthComputable) return;
        const f = event.total ? event.loaded / event.total : 1;
        showProgress(f, `Uploading… ${Math.round(f * 100)} % of ${formatBytes(event.total)}`);
      };
      xhr.upload.onload = startAnalysing;
      xhr.onload = () => {
        state.xhr = null;
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
        state.lastResult = { status: xhr.status, body };
        finish(xhr.status, body, xhr.getResponseHeader("Retry-After"));
        resolve(state.lastResult);
      };
      const failed = (why) => () => {
        state.xhr = null;
        state.lastResult = { status: 0, body: null, error: why };
        if (why === "cancelled") {
          setPhase("idle");
          ui.progress.hidden = true;
        } else {
          setPhase("failed");
          ui.progress.hidden = true;
          showRefusal(null, "The upload did not reach the server",
            "The connection was interrupted. The file may be too large, or the server " +
            "may have stopped; try again.", null);
        }
        resolve(state.lastResult);
      };
      xhr.onerror = failed("network");
      xhr.onabort = failed("cancelled");
      xhr.open("POST", "/avatars");
      xhr.setRequestHeader("Accept", "application/json");
      if (apiKey()) xhr.setRequestHeader("X-API-Key", apiKey());
      xhr.send(form);
    });
  }

  function finish(status, body, retryAfter) {
    ui.progress.hidden = true;
    if ((status === 200 || status === 201) && body && body.id) {
      setPhase("done");
      showSuccess(body, status === 200 || body.created === false);
      refreshList();
      return;
    }
    const denied = accessProblem(status, body, retryAfter, "register avatars");
    if (denied) {
      setPhase("failed");
      showRefusal(status, denied.title, denied.detail, null, body && body.error);
      if (status === 401 || status === 403) ui.apiKey.focus();
      return;
    }
    setPhase(status === 422 || status === 415 || status === 413 ? "refused" : "failed");
    const code = body && body.error;
    const detail = body && body.detail;
    let title;
    let hint = null;
    if (status === 422 && REFUSAL_TITLES[code]) {
      title = REFUSAL_TITLES[code];
      hint = REFUSAL_HINTS[code];
    } else if (status === 415) {
      title = "Not an image or video we can read"; // the server's detail names the formats
    } else if (status === 413) {
      title = "The file is too large";
      hint = "Use a smaller photo, or a shorter or lower-resolution video.";
    } else if (status === 400) {
      title = "The upload was incomplete";
    } else if (status === 422) {
      title = "The avatar could not be registered";
    } else {
      title = `Registration failed (HTTP ${status})`;
    }
    showRefusal(status, title, detail || (status >= 500 ? "The server failed; see its log." : ""),
      hint, code);
  }

  function setResult(...children) {
    ui.result.replaceChildren(...children.filter((c) => c != null));
  }

  function showSuccess(avatar, existing) {
    const quality = avatar.quality && typeof avatar.quality === "object" ? avatar.quality : {};
    const facts = el("dl", { className: "facts" });
    const fact = (label, value) => facts.append(el("dt", {}, label), el("dd", {}, value));
    fact("Id", el("code", { id: "result-id" }, avatar.id));
    fact("Name", avatar.name || "–");
    fact("Media", describeMedia(avatar) || "–");
    for (const [label, text] of describeQuality(quality)) fact(label, text);
    const report = Object.keys(quality).length
      ? el("details", { className: "report" },
        el("summary", {}, "Full quality report"),
        el("pre", {}, JSON.stringify(quality, null, 2)))
      : null;

    const thumb = el("img", {
      id: "result-thumbnail",
      className: "thumb large",
      src: thumbnailUrl(avatar.id),
      alt: `Thumbnail of ${avatar.name || avatar.id}`,
    });
    const link = el("a", { id: "call-link", className: "button primary", href: callUrl(avatar.id) },
      "Start a call with this avatar");

    setResult(
      el("h3", {}, existing ? "Already registered" : "Avatar registered"),
      existing ? el("p", { className: "muted" },
        "This exact file was registered before; here is that avatar.") : null,
      el("div", { className: "result-body" }, thumb, facts),
      report,
      el("p", {}, link),
    );
    ui.result.dataset.outcome = "ok";
    delete ui.result.dataset.error;
    ui.result.hidden = false;
  }

  function showRefusal(status, title, detail, hint, code) {
    setResult(
      el("h3", { id: "result-title" }, title),
      detail ? el("p", { id: "result-detail" }, detail) : null,
      hint ? el("p", { className: "muted" }, hint) : null,
    );
    ui.result.dataset.outcome = "refused";
    if (code) ui.result.dataset.error = code;
    else delete ui.result.dataset.error;
    ui.result.dataset.status = status == null ? "" : String(status);
    ui.result.hidden = false;
  }

  // ---- the list of registered avatars -----------------------------------------------

  async function refreshList() {
    ui.refresh.disabled = true;
    try {
      const response = await fetch("/avatars", { headers: { Accept: "application/json" } });
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      if (!response.ok || !body || !Array.isArray(body.avatars)) {
        const detail = body && (body.detail || body.error);
        throw new Error(`HTTP ${response.status}${detail ? `: ${detail}` : ""}`);
      }
      state.avatars = body.avatars;
      renderList(body.avatars);
      return body.avatars;
    } catch (err) {
      ui.listStatus.textContent = `Could not load the avatars (${err.message}).`;
      ui.listStatus.dataset.state = "error";
      return null;
    } finally {
      ui.refresh.disabled = false;
    }
  }

  function renderList(avatars) {
    ui.list.replaceChildren(...avatars.map(renderRow));
    ui.listStatus.textContent = avatars.length === 1 ? "1 avatar" : `${avatars.length} avatars`;
    ui.listStatus.dataset.state = "ok";
  }

  function renderRow(a) {
    const builtIn = a.id === "default" || a.builtin === true || a.built_in === true;
    const thumb = el("img", {
      className: "thumb", src: thumbnailUrl(a.id), alt: "", loading: "lazy", width: 64, height: 64,
    });
    thumb.addEventListener("error", () => thumb.classList.add("missing"), { once: true });
    const when = a.created_at != null ? a.created_at : a.created;
    const created = typeof when === "string" || typeof when === "number"
      ? new Date(typeof when === "number" ? when * 1000 : when) : null;
    const meta = [describeMedia(a)];
    if (created && !Number.isNaN(created.getTime())) meta.push(created.toLocaleString());
    if (builtIn) meta.push("built in");

    const message = el("p", { className: "row-message", hidden: true });
    const actions = el("div", { className: "row-actions" },
      el("a", { className: "button", href: callUrl(a.id) }, "Call"));
    if (!builtIn) {
      const del = el("button", { type: "button", className: "delete" }, "Delete");
      del.addEventListener("click", () => onDelete(a, del, message));
      actions.append(del);
    }
    return el("li", { dataset: { avatarId: a.id } },
      thumb,
      el("div", { className: "row-text" },
        el("strong", {}, a.name || a.id),
        el("code", {}, a.id),
        el("span", { className: "muted" }, meta.filter(Boolean).join(" · ")),
        message),
      actions);
  }

  function rowMessage(message, text, kind) {
    message.textContent = text;
    message.dataset.kind = kind;
    message.hidden = false;
  }

  // The first click arms the button ("Really delete?"), a second within a few seconds deletes.
  async function onDelete(avatar, button, message) {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "Really delete?";
      button.classList.add("armed");
      clearTimeout(button.disarmTimer);
      button.disarmTimer = setTimeout(() => {
        button.dataset.armed = "0";
        button.textContent = "Delete";
        button.classList.remove("armed");
      }, DELETE_CONFIRM_MS);
      return;
    }
    clearTimeout(button.disarmTimer);
    button.dataset.armed = "0";
    button.disabled = true;
    button.textContent = "Deleting…";
    const label = avatar.name || avatar.id;
    try {
      const response = await fetch(`/avatars/${encodeURIComponent(avatar.id)}`,
        { method: "DELETE", headers: apiKey() ? { "X-API-Key": apiKey() } : {} });
      let body = null;
      try { body = await response.json(); } catch (_) { /* no body */ }
      if (response.ok || response.status === 404) {
        ui.listStatus.textContent = `Deleted “${label}”.`;
        await refreshList();
        ui.listStatus.textContent = `Deleted “${label}”. ` + ui.listStatus.textContent;
        return;
      }
      const denied = accessProblem(response.status, body, response.headers.get("Retry-After"),
        "delete avatars");
      if (denied) {
        rowMessage(message, `${denied.title}. ${denied.detail}`, "error");
      } else if (response.status === 409) {
        rowMessage(message, `“${label}” is in a call right now: end the call, then delete it.`,
          "busy");
      } else {
        const detail = body && (body.detail || body.error);
        rowMessage(message, `Could not delete (HTTP ${response.status})` +
          (detail ? `: ${detail}` : "."), "error");
      }
    } catch (err) {
      rowMessage(message, `Could not reach the server (${err.message}).`, "error");
    }
    button.disabled = false;
    button.textContent = "Delete";
    button.classList.remove("armed");
  }

  // ---- wiring -----------------------------------------------------------------------

  ui.file.addEventListener("change", () => {
    if (!ui.file.files.length) return; // the picker was closed without a choice
    chooseFile(ui.file.files[0]);
    ui.file.value = ""; // so that choosing the same file again is a change too
  });
  ui.name.addEventListener("input", () => { state.nameEdited = true; });
  ui.apiKey.addEventListener("input", saveApiKey);
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    upload().catch(() => { /* shown already */ });
  });
  ui.cancel.addEventListener("click", () => { if (state.xhr) state.xhr.abort(); });
  ui.refresh.addEventListener("click", () => { refreshList(); });

  for (const type of ["dragenter", "dragover"]) {
    ui.drop.addEventListener(type, (event) => {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
      ui.drop.classList.add("dragging");
    });
  }
  ui.drop.addEventListener("dragleave", (event) => {
    if (!ui.drop.contains(event.relatedTarget)) ui.drop.classList.remove("dragging");
  });
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.drop.classList.remove("dragging");
    const files = event.dataTransfer ? event.dataTransfer.files : null;
    if (files && files.length) chooseFile(files[0]);
  });
  // A file dropped beside the zone must not make the browser navigate away to it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }

  loadApiKey();
  chooseFile(null);
  refreshList();

  window.avatarRegister = {
    chooseFile,
    upload,
    refreshList,
    get phase() { return state.phase; },
    get phases() { return state.phases.slice(); },
    get lastResult() { return state.lastResult; },
    get avatars() { return state.avatars; },
    get file() { return state.file; },
  };
})();
