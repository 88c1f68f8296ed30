// The imagetask page: submit prompts, watch the tasks run (Server-Sent Events, with polling
// as a fallback), and show each task's images when it ends. Plain JS, no build step.
// Every URL is relative, so the page works wherever the app is mounted.
"use strict";

(() => {
  const TOKEN_KEY = "imagetask.token";
  const POLL_MS = 3000;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STATUS_TEXT = { queued: "queued", running: "generating\u2026" };

  const $ = (id) => document.getElementById(id);
  const gallery = $("gallery");

  /** task id -> its card */
  const cards = new Map();
  /** task id -> the latest task JSON seen from any source (answer, poll, stream) */
  const latest = new Map();
  /** the parts of each card: {tiles, meta, state, cancel} */
  const parts = new WeakMap();
  /** task ids seen on the stream before any card claimed them (another tab's tasks) */
  const orphans = new Set();
  /** task ids with a poll in flight */
  const polling = new Set();
  /** model ("" = default) -> credits per image, learned from answers */
  const prices = new Map();

  let inflight = 0; // submits not answered yet
  let loaded = false; // the first task lists have been shown
  let authNeeded = false;
  let lastSeq = null; // the seq of the last stream event seen
  let source = null;
  let streamRetry = 1000;
  let streamTimer = null;
  let account = null; // {owner, balance, charging}
  let held = 0; // credits held optimistically by unanswered submits
  let creditEpoch = 0; // bumped when a hold is released: older balance answers are stale
  let creditTimer = null;

  // -- talking to the API --

  const token = () => localStorage.getItem(TOKEN_KEY) || "";

  class ApiError extends Error {
    constructor(status, code, message, field, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field || null;
      this.retryAfter = retryAfter || null;
    }
  }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  async function api(path, { method = "GET", json, form } = {}) {
    const headers = authHeaders();
    let body;
    if (form) {
      body = form; // the browser sets the multipart Content-Type and boundary
    } else if (json !== undefined) {
      body = JSON.stringify(json);
      headers["Content-Type"] = "application/json";
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body, credentials: "same-origin" });
    } catch (err) {
      throw new ApiError(0, "network", "the server cannot be reached");
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (err) {
        data = null;
      }
    }
    const error = (data && data.error) || {};
    if (res.status === 401) needToken(error.message);
    if (!res.ok) {
      throw new ApiError(
        res.status,
        error.code || "http_" + res.status,
        error.message || res.statusText || "the request failed (HTTP " + res.status + ")",
        error.field,
        res.headers.get("Retry-After"),
      );
    }
    return data;
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return String((err && err.message) || err);
    let text = err.field ? err.field + ": " + err.message : err.message;
    if (err.status === 429 && err.retryAfter) text += " (try again in " + err.retryAfter + " s)";
    return text;
  }

  function notice(text) {
    const el = $("notice");
    el.textContent = text || "";
    el.hidden = !text;
  }

  // -- signing in --

  function needToken(message) {
    authNeeded = true;
    $("auth").hidden = false;
    notice("Sign-in needed: " + (message || "the server answered 401") + ".");
    const input = $("token");
    if (document.activeElement !== input) input.focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("forget-token").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("show-token").addEventListener("click", () => {
    const box = $("auth");
    box.hidden = !box.hidden;
    if (!box.hidden) $("token").focus();
  });

  // -- credits --

  function showBalance() {
    const el = $("balance");
    el.replaceChildren();
    if (!account) {
      el.textContent = "\u2026";
      return;
    }
    el.append(document.createTextNode(account.owner));
    if (account.charging) {
      const shown = account.balance - held;
      const strong = document.createElement("strong");
      strong.textContent = String(shown);
      el.append(document.createTextNode(" \u00b7 "), strong, document.createTextNode(shown === 1 ? " credit" : " credits"));
      el.classList.toggle("estimate", held > 0);
      el.title = held > 0 ? "estimate: " + held + " held for tasks being submitted" : "your credit balance";
    } else {
      el.classList.remove("estimate");
      el.title = "signed in as";
    }
  }

  async function loadCredits() {
    const epoch = creditEpoch;
    try {
      const found = await api("api/credits");
      if (epoch !== creditEpoch) return; // a submit was answered since: a newer answer follows
      account = found;
      showBalance();
    } catch (err) {
      if (!account) $("balance").textContent = err.status === 401 ? "not signed in" : "?";
    }
  }

  function refreshCreditsSoon() {
    clearTimeout(creditTimer);
    creditTimer = setTimeout(loadCredits, 250);
  }

  function hold(model, n) {
    if (!account || !account.charging) return 0;
    const cost = n * (prices.has(model) ? prices.get(model) : 1);
    held += cost;
    showBalance();
    return cost;
  }

  function release(cost) {
    if (!cost) return;
    held = Math.max(0, held - cost);
    creditEpoch++;
    showBalance();
  }

  // -- cards --

  function ratioCss(ratio) {
    const m = /^(\d+):(\d+)$/.exec(ratio || "");
    return m ? m[1] + " / " + m[2] : "1 / 1";
  }

  function makeCard(prompt, n, ratio) {
    const count = Math.max(1, Math.min(4, Number(n) || 1));
    const card = document.createElement("div");
    card.className = "card skeleton";
    card.style.setProperty("--ratio", ratioCss(ratio));
    const tiles = document.createElement("div");
    tiles.className = "tiles n" + count;
    for (let i = 0; i < count; i++) {
      const tile = document.createElement("div");
      tile.className = "tile";
      tiles.append(tile);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const text = document.createElement("p");
    text.className = "prompt";
    text.textContent = prompt || "(no prompt)";
    text.title = prompt || "";
    const status = document.createElement("div");
    status.className = "status";
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = "submitting\u2026";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "cancel";
    cancel.textContent = "Cancel";
    cancel.disabled = true;
    cancel.addEventListener("click", () => cancelTask(card));
    status.append(state, cancel);
    meta.append(text, status);
    card.append(tiles, meta);
    parts.set(card, { tiles, meta, state, cancel });
    return card;
  }

  function cardForTask(task) {
    const params = task.params || {};
    const card = makeCard(task.prompt, params.n || (task.images || []).length || 1, params.aspect_ratio);
    claim(card, task.id);
    return card;
  }

  function claim(card, id) {
    card.dataset.taskId = id;
    cards.set(id, card);
    orphans.delete(id);
    const p = parts.get(card);
    if (p && p.cancel) p.cancel.disabled = false;
  }

  const settled = (card) =>
    card.classList.contains("done") || card.classList.contains("failed") || card.dataset.state === "finishing";

  function showEmpty() {
    $("empty").hidden = !loaded || gallery.children.length > 0;
  }

  /** Take in a task's latest state from any source; idempotent, and never goes back from an end. */
  function update(task) {
    if (!task || !task.id) return;
    const prev = latest.get(task.id);
    if (prev && TERMINAL.has(prev.status) && !TERMINAL.has(task.status)) return;
    latest.set(task.id, task);
    const card = cards.get(task.id);
    if (card) render(card, task);
    else adopt(task.id);
  }

  function render(card, task) {
    if (settled(card)) return;
    card.dataset.status = task.status;
    const p = parts.get(card);
    if (task.status === "succeeded") {
      finish(card, task);
    } else if (task.status === "failed") {
      const error = task.error || {};
      fail(card, error.message || "the task failed", error.code ? "failed: " + error.code : "failed");
      refreshCreditsSoon(); // a failed task is refunded
    } else if (task.status === "cancelled") {
      fail(card, "cancelled", "ended");
      refreshCreditsSoon();
    } else if (p && p.state && card.dataset.state !== "cancelling") {
      let text = STATUS_TEXT[task.status] || task.status;
      if (task.attempts > 1) text += " (attempt " + task.attempts + ")";
      p.state.textContent = text;
    }
  }

  function fail(card, message, label) {
    card.classList.remove("skeleton");
    card.classList.add("failed");
    card.dataset.state = "ended";
    const p = parts.get(card);
    if (!p) return;
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = message;
    p.meta.append(error);
    p.state.textContent = label || "failed";
    if (p.cancel) p.cancel.remove();
  }

  /** An image URL an <img> can load: a blob: URL fetched with the token when one is set. */
  async function imageSrc(url) {
    if (!token()) return url;
    try {
      const res = await fetch(url, { headers: authHeaders(), credentials: "same-origin" });
      if (res.status === 401) needToken();
      if (!res.ok) return url;
      return URL.createObjectURL(await res.blob());
    } catch (err) {
      return url;
    }
  }

  function openImage(ev, url) {
    if (!token()) return; // the link works as it is (cookies, or no sign-in)
    ev.preventDefault();
    const win = window.open("", "_blank");
    imageSrc(url).then((src) => {
      if (win) win.location.href = src;
      else window.location.href = src;
    });
  }

  async function finish(card, task) {
    card.dataset.state = "finishing";
    const images = task.images || [];
    const p = parts.get(card);
    if (!images.length) {
      card.dataset.state = "";
      fail(card, "the task ended without images");
      return;
    }
    const links = await Promise.all(
      images.map(async (image) => {
        const img = document.createElement("img");
        img.alt = task.prompt || "generated image";
        img.decoding = "async";
        if (image.width && image.height) {
          img.width = image.width;
          img.height = image.height;
        }
        img.src = await imageSrc(image.thumbnail_url || image.url);
        try {
          await img.decode();
        } catch (err) {
          // shown anyway: the browser's broken-image box says what happened
        }
        const link = document.createElement("a");
        link.className = "tile";
        link.href = image.url;
        link.target = "_blank";
        link.rel = "noopener";
        if (image.width && image.height) {
          link.style.setProperty("--ratio", image.width + " / " + image.height);
          link.title = image.width + " \u00d7 " + image.height;
        }
        link.addEventListener("click", (ev) => openImage(ev, image.url));
        link.append(img);
        return link;
      }),
    );
    p.tiles.className = "tiles n" + Math.min(4, links.length);
    p.tiles.replaceChildren(...links);
    card.classList.remove("skeleton");
    card.classList.add("done");
    card.dataset.state = "ended";
    p.state.textContent = links.length === 1 ? "1 image" : links.length + " images";
    if (p.cancel) p.cancel.remove();
  }

  async function cancelTask(card) {
    const id = card.dataset.taskId;
    const p = parts.get(card);
    if (!id || settled(card)) return;
    p.cancel.disabled = true;
    card.dataset.state = "cancelling";
    p.state.textContent = "cancelling\u2026";
    try {
      const task = await api("api/tasks/" + encodeURIComponent(id) + "/cancel", { method: "POST" });
      card.dataset.state = "";
      update(task);
    } catch (err) {
      card.dataset.state = "";
      p.cancel.disabled = false;
      p.state.textContent = "cannot cancel: " + describe(err);
    }
  }

  /** A task first seen on the stream: another tab's, or ours before its submit was answered. */
  function adopt(id) {
    orphans.add(id);
    adoptOrphans();
  }

  function adoptOrphans() {
    if (!loaded || inflight > 0) return; // an unanswered submit may still claim them
    for (const id of orphans) {
      orphans.delete(id);
      if (cards.has(id)) continue;
      const task = latest.get(id);
      if (!task) continue;
      const card = cardForTask(task);
      gallery.prepend(card);
      render(card, task);
    }
    showEmpty();
  }

  // -- creating tasks --

  $("compose").addEventListener("submit", (ev) => {
    ev.preventDefault();
    create();
  });

  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      $("create").click();
    }
  });

  $("images").addEventListener("change", () => {
    $("clear-images").hidden = !$("images").files.length;
  });
  $("clear-images").addEventListener("click", () => {
    $("images").value = "";
    $("clear-images").hidden = true;
  });

  function create() {
    // Everything up to the first await runs in the click: the skeleton shows at once.
    const prompt = $("prompt").value.trim();
    const n = Number($("n").value) || 1;
    const model = $("model").value.trim();
    const ratio = $("aspect").value;
    const files = Array.from($("images").files || []);
    const card = makeCard(prompt, n, ratio);
    gallery.prepend(card);
    showEmpty();
    const cost = hold(model, n);
    inflight++;
    submit(card, { prompt, n, model, ratio, files }).finally(() => {
      inflight--;
      release(cost);
      loadCredits(); // correct the estimate from the server
      adoptOrphans();
    });
  }

  async function submit(card, { prompt, n, model, ratio, files }) {
    let options;
    if (files.length) {
      const form = new FormData();
      form.append("prompt", prompt);
      form.append("n", String(n));
      if (model) form.append("model", model);
      if (ratio) form.append("aspect_ratio", ratio);
      for (const file of files) form.append("images", file, file.name);
      options = { method: "POST", form };
    } else {
      const json = { prompt, n };
      if (model) json.model = model;
      if (ratio) json.aspect_ratio = ratio;
      options = { method: "POST", json };
    }
    let task;
    try {
      task = await api("api/tasks", options);
    } catch (err) {
      fail(card, describe(err), err.status ? "refused (HTTP " + err.status + ")" : "not sent");
      return;
    }
    if (typeof task.cost === "number" && n > 0) {
      prices.set(model, task.cost / n);
      if (task.model) prices.set(task.model, task.cost / n);
    }
    const existing = cards.get(task.id);
    if (existing && existing !== card) {
      // The same task again (an idempotent resubmit): keep one card.
      card.remove();
      return;
    }
    claim(card, task.id);
    const seen = latest.get(task.id);
    update(seen && TERMINAL.has(seen.status) ? seen : task);
  }

  // -- following the tasks: the stream, and polling as a fallback --

  async function connectStream() {
    clearTimeout(streamTimer);
    if (source) {
      source.close();
      source = null;
    }
    if (typeof EventSource === "undefined" || authNeeded) return;
    let ticket;
    try {
      ticket = (await api("api/stream/ticket", { method: "POST" })).ticket;
    } catch (err) {
      scheduleStream();
      return;
    }
    let url = "api/stream?ticket=" + encodeURIComponent(ticket);
    if (lastSeq !== null) url += "&last_event_id=" + encodeURIComponent(lastSeq);
    const es = new EventSource(url);
    source = es;
    es.addEventListener("open", () => {
      streamRetry = 1000;
    });
    es.addEventListener("task", (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (err) {
        return;
      }
      if (typeof msg.seq === "number" && (lastSeq === null || msg.seq > lastSeq)) lastSeq = msg.seq;
      if (msg.task) update(msg.task);
    });
    es.addEventListener("error", () => {
      if (source !== es) return;
      es.close(); // a new ticket, and resume after the last event seen
      source = null;
      scheduleStream();
    });
  }

  function scheduleStream() {
    if (authNeeded) return;
    clearTimeout(streamTimer);
    streamTimer = setTimeout(connectStream, streamRetry);
    streamRetry = Math.min(streamRetry * 2, 30000);
  }

  function pollPending() {
    if (authNeeded) return;
    for (const [id, card] of cards) {
      if (settled(card) || polling.has(id)) continue;
      polling.add(id);
      api("api/tasks/" + encodeURIComponent(id))
        .then(update, (err) => {
          if (err.status === 404) fail(card, "this task no longer exists");
        })
        .finally(() => polling.delete(id));
    }
  }

  // -- the first view --

  async function loadTasks() {
    const [pending, recent] = await Promise.allSettled([api("api/tasks/pending"), api("api/tasks?limit=12")]);
    const found = new Map();
    const take = (task) => {
      const prev = found.get(task.id);
      if (!prev || !TERMINAL.has(prev.status)) found.set(task.id, task);
    };
    for (const result of [pending, recent]) {
      if (result.status === "fulfilled") (result.value.tasks || []).forEach(take);
      else if (result.reason.status !== 401) notice("The tasks cannot be loaded: " + describe(result.reason));
    }
    const tasks = Array.from(found.values()).sort((a, b) =>
      a.created_at === b.created_at ? (a.id < b.id ? 1 : -1) : a.created_at < b.created_at ? 1 : -1,
    );
    for (const task of tasks) {
      if (cards.has(task.id)) {
        update(task);
        continue;
      }
      const prev = latest.get(task.id);
      if (!(prev && TERMINAL.has(prev.status) && !TERMINAL.has(task.status))) latest.set(task.id, task);
      const card = cardForTask(task);
      gallery.append(card); // after any card created meanwhile (those are newer)
      render(card, latest.get(task.id));
    }
    loaded = true;
    adoptOrphans();
    showEmpty();
  }

  window.addEventListener("pagehide", () => {
    if (source) source.close();
  });

  showBalance();
  loadCredits();
  connectStream();
  loadTasks();
  setInterval(pollPending, POLL_MS);
})();
