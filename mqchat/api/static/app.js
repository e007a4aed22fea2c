"use strict";
// The mqchat browser page. It speaks the protocol of docs/protocol.md: HTTP for logging in, the
// conversation list, history and files; MQTT over WebSocket (MQTT.js) for everything live. What it
// keeps in localStorage: the login (user, token and event key), the device ids of this browser, and
// per user and device the cursor (the last stream seq processed) and the outbox (messages not yet
// acknowledged). Events on the stream and device topics count only with the server's "sig"
// (origin.js): a forged one must not take the place of a real one.
//
// Several tabs: each tab is its own device, with its own MQTT connection and cursor. A tab takes
// the first device id of this browser that no other open tab holds (a Web Lock per id, held while
// the tab lives), so ids are reused and a new tab does not replay the whole stream; without Web
// Locks (plain http from another host is not a secure context) each tab makes its own id, kept in
// sessionStorage. The token is not scoped to a device, so every tab can use it.

const RETRYABLE = new Set(["server_busy", "storage_unavailable", "rate_limited"]);
const RESEND_AFTER_MS = 15000;
const ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const PAGE_SIZE = 50;
const TYPING_IDLE_MS = 3000;
const TYPING_SHOWN_MS = 6000;
const REQUEST_TIMEOUT_MS = 30000;
const TRANSFER_TIMEOUT_MS = 10 * 60 * 1000; // uploads and downloads of files: up to the size limit on a slow link

const $ = (id) => document.getElementById(id);

const saved = {
  get(key, fallback) {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  },
  set(key, value) { localStorage.setItem(key, JSON.stringify(value)); },
  remove(key) { localStorage.removeItem(key); },
};

function randomHex(bytes) {
  // crypto.getRandomValues works on plain http too (crypto.randomUUID needs a secure context).
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A Web Lock held for as long as the page lives; false if another tab holds it. */
function holdLock(name) {
  return new Promise((resolve) => {
    navigator.locks.request(name, { ifAvailable: true }, (lock) => {
      resolve(lock !== null);
      return lock === null ? undefined : new Promise(() => {}); // held while the page lives
    });
  });
}

/** This tab's device id (see the top of this file). */
async function claimDevice() {
  if (!navigator.locks) {
    let id = sessionStorage.getItem("mqchat.device");
    if (!id) {
      id = `web-${randomHex(8)}`;
      sessionStorage.setItem("mqchat.device", id);
    }
    return id;
  }
  const legacy = localStorage.getItem("mqchat.device"); // one id per profile, from before tabs
  const pool = saved.get("mqchat.devices", legacy ? [legacy] : []);
  for (const id of pool) {
    if (await holdLock(`mqchat-device-${id}`)) return id;
  }
  const id = `web-${randomHex(8)}`;
  await holdLock(`mqchat-device-${id}`);
  const now = saved.get("mqchat.devices", []); // another tab may have added one meanwhile
  saved.set("mqchat.devices", [...now.filter((d) => d !== id), id]);
  return id;
}

const state = {
  user: null,
  token: null,
  device: null,
  config: null,
  mqtt: null,
  ready: false, // connected and subscribed
  cursor: 0, // highest seq of the stream processed without a gap
  acked: 0,
  held: new Map(), // seq -> event that arrived after a gap, waiting for the gap to fill
  catchingUp: false, // the server's catch-up pages after a SUBSCRIBE are still coming
  firstPage: false, // the next sync_response is the first catch-up page of this connection
  syncing: false, // a sync_messages of ours is unanswered
  syncFrom: 0, // the since_seq of the last sync_messages we sent
  gap: null, // {previous_cursor, oldest_seq, at}: retention deleted events this device had not read
  expired: 0, // cursor_expired refusals received (each asks for at most one sync)
  resyncOnSubscribed: false, // a refusal came before our SUBACK: sync and ack once subscribed
  conversations: [], // from GET /v1/conversations, with placeholders for new chats
  groups: new Map(), // group_id -> group (for names and members)
  open: null, // the conversation id shown
  messages: new Map(), // server_msg_id -> message of the open conversation (history format)
  outbox: [], // {client_msg_id, conversation_id, content, status, sent_at, error}
  delivered: {}, // conversation id -> {user: highest message id delivered} (watermarks)
  read: {}, // conversation id -> {user: highest message id read}
  readUpTo: {}, // conversation id -> our own read marker
  timers: {},
  eventKey: null, // base64url, from POST /v1/token: verifies the sig of our stream and device events
  verify: null, // payload -> body without the sig, or null (origin.js)
  inbound: Promise.resolve(), // incoming messages, handled one after the other (verifying is async)
  rejected: {}, // kind -> how many payloads without the server's sig were dropped
  olderBefore: null, // before_id of the next older history page of the open conversation, or null
  loadingOlder: false,
  uploads: [], // {key, conversation_id, name} files being uploaded
  presence: new Map(), // user -> {status, last_seen}
  typing: new Map(), // conversation id -> Map(user -> until ms)
  typingSent: null, // the conversation we told we are typing in
  watched: [], // the live topics of the open conversation (presence, group typing)
  blobs: new Map(), // file id (+ ":thumb") -> object URL
  showMembers: false,
  refreshes: 0, // refreshes of the list started: only the newest one's answer is applied
  refreshing: null, // the newest refresh (a promise)
};

const key = (name) => `mqchat.${name}.${state.user}.${state.device}`;

// ---------------------------------------------------------------------------------- HTTP

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * One HTTP call. A server that accepts the connection and never answers (a stalled proxy, a
 * node in trouble) must not leave a button spinning for ever: the call is aborted after
 * `timeoutMs` (reading the body included) and reported as `timeout`. A timer of the page's own
 * (not AbortSignal.timeout) so that a test's fake clock can run it.
 */
async function request(method, path, { body, headers = {}, timeoutMs = REQUEST_TIMEOUT_MS } = {}) {
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal: abort.signal });
  } catch {
    clearTimeout(timer);
    if (abort.signal.aborted) throw new ApiError(0, "timeout", "the server did not answer in time");
    throw new ApiError(0, "network", "the server cannot be reached");
  }
  if (response.status === 401 && state.token) {
    logout("Your session has ended: log in again.");
  }
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    clearTimeout(timer);
    throw new ApiError(response.status, data?.error?.code ?? "http_error", data?.error?.message ?? response.statusText);
  }
  // The caller reads the body after this returns: the timer runs on until it has, and is
  // harmless once it has (aborting a finished fetch does nothing).
  return response;
}

async function api(method, path, body) {
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  const response = await request(method, path, { body: body === undefined ? undefined : JSON.stringify(body), headers });
  return response.status === 204 ? null : response.json().catch(() => null);
}

/** A file of a message, fetched with the token, as an object URL (cached). */
async function fileUrl(fileId, thumbnail = false) {
  const cacheKey = thumbnail ? `${fileId}:thumb` : fileId;
  if (!state.blobs.has(cacheKey)) {
    const path = `/v1/files/${encodeURIComponent(fileId)}${thumbnail ? "/thumbnail" : ""}`;
    const promise = request("GET", path, { timeoutMs: TRANSFER_TIMEOUT_MS }).then((r) => r.blob()).then((blob) => URL.createObjectURL(blob));
    state.blobs.set(cacheKey, promise);
    promise.catch(() => state.blobs.delete(cacheKey));
  }
  return state.blobs.get(cacheKey);
}

async function uploadFile(file) {
  const limit = state.config?.max_file_bytes;
  if (limit && file.size > limit) throw new ApiError(413, "file_too_large", `larger than ${limit} bytes`);
  const form = new FormData();
  form.append("file", file, file.name);
  return (await request("POST", "/v1/files", { body: form, timeoutMs: TRANSFER_TIMEOUT_MS })).json();
}

// ---------------------------------------------------------------------------------- UI helpers

function formatSize(bytes) {
  if (bytes < 1000) return `${bytes} B`;
  if (bytes < 1000 * 1000) return `${(bytes / 1000).toFixed(1)} kB`;
  return `${(bytes / 1000 / 1000).toFixed(1)} MB`;
}

/** What an error means to a person, rather than its code. */
const FRIENDLY = {
  network: () => "Cannot reach the server. Check your connection and try again.",
  timeout: () => "The server did not answer in time. Try again.",
  invalid_credentials: () => "Wrong user name or password.",
  unknown_user: () => "There is no user with that name.",
  unknown_recipient: () => "There is no user with that name.",
  unknown_group: () => "That group does not exist.",
  not_a_member: () => "You are not a member of that group.",
  not_allowed: () => "You are not allowed to do that.",
  recall_window_passed: () => "It is too late to recall that message.",
  rate_limited: () => "You are going a bit fast: wait a moment and try again.",
  server_busy: () => "The server is busy: try again in a moment.",
  storage_unavailable: () => "The server cannot store anything right now: try again in a moment.",
  group_full: () => "That group is full.",
  file_too_large: () => `That file is too large: the limit is ${formatSize(state.config?.max_file_bytes ?? 0)}.`,
  unsupported_file_type: () => "That kind of file cannot be sent: images, PDFs, text, audio, video and zip files can.",
  unknown_file: () => "That file is no longer available.",
  payload_too_large: () => "That message is too long.",
  registration_closed: () => "Registration is closed on this server.",
  cursor_expired: () => OLDER_GONE,
};

const OLDER_GONE = "Older messages are no longer available on the server.";

function friendly(error) {
  const say = FRIENDLY[error.code];
  if (say) return say(error);
  return error.message ? `Something went wrong: ${error.message}` : "Something went wrong.";
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
  later("error", 8000, clearError);
}

function clearError() {
  $("error").hidden = true;
}

function setStatus(status) {
  const el = $("connection");
  el.textContent = status;
  el.className = `status ${status}`;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "testid") node.dataset.testid = value;
    else node[name] = value;
  }
  node.append(...children);
  return node;
}

function later(name, ms, fn) {
  clearTimeout(state.timers[name]);
  state.timers[name] = setTimeout(fn, ms);
}

// ---------------------------------------------------------------------------------- login

async function login(user, password) {
  // Not scoped to a device: every tab of this browser (each its own device) uses it.
  const token = await api("POST", "/v1/token", { user_id: user, password });
  saved.set("mqchat.session", { user, token: token.access_token, eventKey: token.event_key });
  await start(user, token.access_token, token.event_key);
}

function logout(message) {
  const client = state.mqtt;
  state.mqtt = null;
  if (client) client.end(true);
  saved.remove("mqchat.session");
  sessionStorage.removeItem("mqchat.open");
  Object.values(state.timers).forEach(clearTimeout);
  Object.assign(state, {
    user: null, token: null, ready: false, open: null, conversations: [], messages: new Map(),
    held: new Map(), outbox: [], delivered: {}, read: {}, readUpTo: {}, eventKey: null, verify: null,
    watched: [], presence: new Map(), typing: new Map(), uploads: [],
    refreshes: state.refreshes + 1, refreshing: null, // a refresh in flight belongs to the old session
  });
  document.body.classList.remove("in-conversation");
  setStatus("offline");
  $("chat").hidden = true;
  $("logout").hidden = true;
  $("me").textContent = "";
  $("login").hidden = false;
  if (message) showError(message);
}

async function start(user, token, eventKey) {
  Object.assign(state, { user, token });
  await useEventKey(eventKey);
  state.cursor = saved.get(key("cursor"), 0);
  state.gap = saved.get(key("gap"), null);
  state.outbox = saved.get(key("outbox"), []);
  $("login").hidden = true;
  $("chat").hidden = false;
  $("logout").hidden = false;
  $("me").textContent = `${user} (${state.device})`;
  state.config = await api("GET", "/v1/client-config");
  await refreshConversations();
  const reopen = sessionStorage.getItem("mqchat.open");
  if (reopen) openConversation(reopen);
  connect();
  // Tokens last auth.token_ttl_seconds (a day by default): renew well before, for reconnects.
  state.timers.refresh = setInterval(refreshToken, 30 * 60 * 1000);
}

async function refreshToken() {
  const token = await api("POST", "/v1/token/refresh");
  state.token = token.access_token;
  await useEventKey(token.event_key);
  saved.set("mqchat.session", { user: state.user, token: state.token, eventKey: state.eventKey });
  if (state.mqtt) state.mqtt.options.password = state.token; // used by the next reconnect
}

async function useEventKey(eventKey) {
  if (!eventKey || eventKey === state.eventKey) return;
  state.verify = await mqchatOrigin.makeVerifier(mqchatOrigin.decodeBase64url(eventKey));
  state.eventKey = eventKey;
}

// ---------------------------------------------------------------------------------- MQTT

function brokerUrl(config) {
  const secure = location.protocol === "https:";
  const port = secure ? config.wss_port : config.ws_port;
  if (port == null) throw new Error(`the server runs no MQTT over ${secure ? "secure " : ""}WebSocket listener`);
  return `${secure ? "wss" : "ws"}://${location.hostname}:${port}${config.ws_path}`;
}

const streamTopic = () => `chat/user/${state.user}`;
const deviceTopic = () => `chat/device/${state.user}/${state.device}`;
const inboxTopic = () => `chat/in/${state.user}/${state.device}`;

function connect() {
  setStatus("connecting");
  const client = mqtt.connect(brokerUrl(state.config), {
    protocolVersion: 4, // the broker speaks MQTT 3.1.1
    clientId: `${state.user}:${state.device}`,
    username: state.user,
    password: state.token,
    clean: true, // delivery comes from the store and the cursor, not from MQTT sessions
    keepalive: 30,
    reconnectPeriod: 2000,
    connectTimeout: 10000,
    resubscribe: false, // we subscribe on every connect ourselves: each SUBSCRIBE starts a catch-up
  });
  state.mqtt = client;
  client.on("connect", () => onConnect(client));
  client.on("reconnect", () => setStatus("reconnecting"));
  client.on("close", () => {
    if (state.mqtt !== client) return;
    state.ready = false;
    setStatus(navigator.onLine ? "reconnecting" : "offline");
  });
  client.on("offline", () => setStatus("offline"));
  client.on("connect", () => console.debug("mqtt: connected"));
  client.on("close", () => console.debug("mqtt: connection closed"));
  client.on("error", (error) => onConnectError(error));
  client.on("message", (topic, payload) => onMessage(topic, payload));
}

function onConnect(client) {
  Object.assign(state, { catchingUp: true, firstPage: true, syncing: false, acked: 0, resyncOnSubscribed: false });
  const topics = { [streamTopic()]: { qos: 1 }, [deviceTopic()]: { qos: 1 } };
  client.subscribe(topics, (error, granted) => {
    if (error || granted.some((g) => g.qos === 128)) {
      showError(`the server refused the subscription: ${error?.message ?? "SUBACK 0x80"}`);
      return;
    }
    state.ready = true;
    setStatus("online");
    if (state.resyncOnSubscribed) {
      state.resyncOnSubscribed = false;
      state.syncing = false;
      requestSync();
      sendAck();
    }
    if (state.watched.length) client.subscribe(state.watched, { qos: 0 });
    if (state.acked > 0 || state.cursor > 0) refreshInBackground(); // what changed while away
    flushOutbox();
    maybeMarkRead();
  });
}

/** The live topics of the open conversation: the peer's presence, or the group's typing. */
function watch(topics) {
  const client = state.mqtt;
  const old = state.watched.filter((t) => !topics.includes(t));
  const added = topics.filter((t) => !state.watched.includes(t));
  state.watched = topics;
  if (!client || !state.ready) return; // onConnect subscribes them
  if (old.length) client.unsubscribe(old);
  if (added.length) client.subscribe(added, { qos: 0 }, () => {}); // refused (not a contact yet): nothing shows
}

async function onConnectError(error) {
  // CONNACK 5 is a bad token, but also "too many connections": only a 401 from the API is final.
  if (error.code === 5) {
    if (Date.now() - (state.lastRefusal ?? 0) < 60000) return; // once a minute is enough
    state.lastRefusal = Date.now();
    try {
      await refreshToken();
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) console.warn("token refresh failed", e);
    }
    return;
  }
  console.warn("mqtt:", error.message);
}

function publish(command) {
  if (!state.mqtt || !state.ready) return false;
  state.mqtt.publish(inboxTopic(), JSON.stringify(command), { qos: 1 });
  return true;
}

function onMessage(topic, payload) {
  // Checking the sig is async: chain the messages so that they are handled in arrival order.
  const client = state.mqtt;
  state.inbound = state.inbound
    .then(() => handleMessage(client, topic, payload))
    .catch((error) => console.warn("mqtt: a message could not be handled", error));
}

async function handleMessage(client, topic, payload) {
  const signed = topic === deviceTopic() ? "device" : topic === streamTopic() ? "stream" : null;
  let body = payload;
  if (signed) {
    // Only the server and this user's devices hold the key: anything else put on our topics
    // (a Last Will once got past the broker's ACL) is dropped before it can touch the cursor.
    body = state.verify ? await state.verify(payload) : null;
    if (body === null) return reject(signed, payload);
  }
  if (state.mqtt !== client) return; // logged out meanwhile
  let event;
  try {
    event = JSON.parse(new TextDecoder().decode(body));
  } catch {
    return;
  }
  if (signed === "device") {
    if (event.type === "message_ack") onMessageAck(event);
    else if (event.type === "sync_response") onSyncResponse(event);
    else if (event.type === "error") onErrorEvent(event);
  } else if (signed === "stream" && typeof event.seq === "number") {
    receive([event]);
  } else if (event.type === "typing" && (signed === "stream" || topic.startsWith("chat/group/"))) {
    onTyping(event); // ephemeral: no seq, never stored
  } else if (topic.startsWith("chat/presence/") && typeof event.status === "string") {
    state.presence.set(event.user_id, event);
    renderHeader();
  }
}

function reject(where, payload) {
  const kind = `${where}: ${state.verify === null ? "no event key" : mqchatOrigin.splitSig(payload) ? "bad signature" : "unsigned"}`;
  state.rejected[kind] = (state.rejected[kind] ?? 0) + 1;
  if (state.rejected[kind] === 1) console.warn(`dropping an event that is not the server's (${kind}); further ones are counted`);
}

// ---------------------------------------------------------------------------------- the stream

/** Events in seq order, each once: drop what the cursor covers, hold what follows a gap. */
function receive(events) {
  for (const event of events) {
    if (event.seq > state.cursor) state.held.set(event.seq, event);
  }
  const before = state.cursor;
  while (state.held.has(state.cursor + 1)) {
    const event = state.held.get(state.cursor + 1);
    state.held.delete(state.cursor + 1);
    state.cursor += 1;
    apply(event);
  }
  if (state.cursor > before) {
    saved.set(key("cursor"), state.cursor);
    later("ack", 200, sendAck);
    renderMessages();
    later("refresh", 300, refreshInBackground);
  }
  if (state.held.size > 0 && !state.catchingUp) requestSync(); // a gap: fill it
}

function onSyncResponse(page) {
  if (state.firstPage) {
    state.firstPage = false;
    // The first catch-up page starts after the server's cursor of this device. If it is ahead
    // of ours (this browser's storage was cleared), this device already had those events.
    const serverCursor = page.events.length ? page.events[0].seq - 1 : page.latest_seq;
    if (state.catchingUp && serverCursor > state.cursor) {
      state.cursor = serverCursor;
      for (const seq of state.held.keys()) if (seq <= serverCursor) state.held.delete(seq);
    }
  }
  if (!page.has_more) state.catchingUp = false;
  if (!state.catchingUp) state.syncing = false;
  receive(page.events);
  // Catch-up sends its next page by itself; our own syncs are paged by asking again.
  if (!state.catchingUp && (page.has_more || page.latest_seq > state.cursor || state.held.size > 0)) requestSync();
  if (!state.catchingUp) later("ack", 0, sendAck);
}

function requestSync() {
  if (state.syncing || !state.ready) return;
  state.syncing = true;
  state.syncFrom = state.cursor;
  publish({ type: "sync_messages", since_seq: state.cursor, limit: 200 });
  later("sync-timeout", 10000, () => { state.syncing = false; });
}

/**
 * Retention deleted events after our cursor (protocol.md, "cursor_expired: resetting a device"):
 * read on from oldest_seq - 1, ack that at once (so the server's catch-ups work again), rebuild
 * the open conversation from the server's history, and say in it that older messages are gone.
 * A refusal about a gap already passed (the catch-up from the server's cursor before our ack
 * reached it, or the answer to a sync asked before the reset) only makes sure that a sync from
 * past the gap is under way; such a sync is never refused with the same oldest_seq: no loop.
 */
function onCursorExpired(error) {
  state.expired += 1;
  const point = error.oldest_seq - 1;
  state.catchingUp = false; // a refused catch-up sends no page
  state.firstPage = false;
  if (point > state.cursor) {
    console.info(`mqchat: seqs ${state.cursor + 1} to ${point} were deleted by the server (retention); reading on from ${error.oldest_seq}`);
    state.gap = { previous_cursor: state.cursor, oldest_seq: error.oldest_seq, at: new Date().toISOString() };
    saved.set(key("gap"), state.gap);
    state.cursor = point;
    saved.set(key("cursor"), point);
    for (const seq of state.held.keys()) if (seq <= point) state.held.delete(seq);
    state.syncing = false;
    later("ack", 0, sendAck);
    receive([]); // events held after the gap may follow on now
    if (state.open) openConversation(state.open);
    refreshInBackground();
  } else if (state.syncing && state.syncFrom >= point) {
    return; // its answer is on the way
  } else {
    state.syncing = false;
  }
  if (!state.ready) state.resyncOnSubscribed = true; // nothing can be published before the SUBACK
  requestSync();
}

/** Whether to say above a conversation's first message that what came before it is gone: this
 * device was told of a gap and the conversation began before that. (The server's clock against
 * the browser's: only a conversation begun within their skew of the reset could be misjudged.) */
function olderGone(stored) {
  return state.gap !== null && stored.length > 0 && Date.parse(stored[0].created_at) < Date.parse(state.gap.at);
}

function sendAck() {
  if (state.cursor > state.acked && publish({ type: "ack", seq: state.cursor })) state.acked = state.cursor;
}

function conversationOf(message) {
  if (message.group_id) return `group:${message.group_id}`;
  return `user:${message.from_user === state.user ? message.to_user : message.from_user}`;
}

function raise(marks, conversation, user, messageId) {
  const forConversation = (marks[conversation] ??= {});
  forConversation[user] = Math.max(forConversation[user] ?? 0, messageId);
}

function apply(event) {
  switch (event.type) {
    case "new_message": {
      const message = {
        server_msg_id: event.server_msg_id, client_msg_id: event.client_msg_id, from_user: event.from_user,
        to_user: event.to_user ?? null, group_id: event.group_id ?? null, content: event.content ?? null,
        msg_type: event.msg_type, created_at: event.created_at, recalled_at: event.recalled_at ?? null,
        attachment: event.attachment ?? null,
      };
      if (message.from_user === state.user) dropFromOutbox(message.client_msg_id);
      else stopTypingOf(conversationOf(message), message.from_user); // their message ends their typing
      if (conversationOf(message) === state.open) {
        state.messages.set(message.server_msg_id, message);
        watchAgain();
        later("read", 0, maybeMarkRead);
      }
      break;
    }
    case "message_delivered":
      raise(state.delivered, event.conversation_id, event.delivered_to, event.message_id);
      break;
    case "message_read":
      raise(state.read, event.conversation_id, event.read_by, event.message_id);
      break;
    case "read_marker":
      state.readUpTo[event.conversation_id] = Math.max(state.readUpTo[event.conversation_id] ?? 0, event.message_id);
      break;
    case "message_recalled": {
      const message = state.messages.get(event.message_id);
      if (message) Object.assign(message, { content: null, attachment: null, recalled_at: event.recalled_at });
      break;
    }
    case "group_updated":
      onGroupUpdated(event);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------- sending

function saveOutbox() {
  saved.set(key("outbox"), state.outbox);
}

function commandOf(entry) {
  const [kind, target] = splitConversation(entry.conversation_id);
  const common = { client_msg_id: entry.client_msg_id, content: entry.content, msg_type: "text" };
  if (entry.attachment) common.attachment = entry.attachment.id;
  return kind === "group"
    ? { type: "send_group_message", group_id: target, ...common }
    : { type: "send_message", to_user: target, ...common };
}

function sendEntry(entry) {
  if (publish(commandOf(entry))) entry.sent_at = Date.now();
}

/** After every (re)connect, and now and then: unacknowledged sends go out again with the same
 * client_msg_id (the server stores each once and answers a repeat with the original ack). */
function flushOutbox(onlyOverdue = false) {
  const now = Date.now();
  for (const entry of state.outbox) {
    if (entry.status !== "pending" || (entry.retry_at ?? 0) > now) continue;
    if (onlyOverdue && entry.sent_at && now - entry.sent_at < RESEND_AFTER_MS) continue;
    sendEntry(entry);
  }
}

function send(content, attachment = null, conversationId = state.open) {
  const entry = {
    client_msg_id: `web-${randomHex(12)}`, conversation_id: conversationId, content, attachment,
    status: "pending", sent_at: null, created_at: new Date().toISOString(),
  };
  state.outbox.push(entry);
  saveOutbox();
  sendEntry(entry);
  stopTyping();
  renderMessages();
  scrollToBottom();
}

async function sendFiles(files) {
  const conversationId = state.open;
  for (const file of files) {
    const upload = { key: randomHex(6), conversation_id: conversationId, name: file.name };
    state.uploads.push(upload);
    renderMessages();
    scrollToBottom();
    try {
      const attachment = await uploadFile(file);
      send("", attachment, conversationId);
    } catch (error) {
      showError(error instanceof ApiError ? friendly(error) : String(error));
    } finally {
      state.uploads = state.uploads.filter((u) => u !== upload);
      renderMessages();
    }
  }
}

function recall(messageId) {
  if (!publish({ type: "recall_message", message_id: messageId })) showError("You are offline: try again when connected.");
}

function dropFromOutbox(clientMsgId) {
  const index = state.outbox.findIndex((e) => e.client_msg_id === clientMsgId);
  if (index < 0) return null;
  const [entry] = state.outbox.splice(index, 1);
  saveOutbox();
  return entry;
}

/** A first message makes two users contacts: the presence subscription refused before may pass now. */
function watchAgain() {
  const topics = state.watched;
  if (!topics.some((t) => t.startsWith("chat/presence/")) || state.presence.has(splitConversation(state.open)[1])) return;
  state.watched = [];
  watch(topics);
}

function onMessageAck(ack) {
  const entry = dropFromOutbox(ack.client_msg_id);
  if (entry?.conversation_id === state.open) watchAgain();
  if (entry && entry.conversation_id === state.open && !state.messages.has(ack.server_msg_id)) {
    const [kind, target] = splitConversation(entry.conversation_id);
    state.messages.set(ack.server_msg_id, {
      server_msg_id: ack.server_msg_id, client_msg_id: ack.client_msg_id, from_user: state.user,
      to_user: kind === "user" ? target : null, group_id: kind === "group" ? target : null,
      content: entry.content, msg_type: "text", created_at: ack.created_at, recalled_at: null,
      attachment: entry.attachment ?? null,
    });
  }
  renderMessages();
  later("refresh", 300, refreshInBackground);
}

function onErrorEvent(error) {
  if (error.code === "cursor_expired" && typeof error.oldest_seq === "number") return onCursorExpired(error);
  const entry = error.ref && state.outbox.find((e) => e.client_msg_id === error.ref);
  if (entry && RETRYABLE.has(error.code)) {
    entry.retry_at = Date.now() + 1000 * (error.retry_after ?? 2);
    return; // not stored, not now: the resend timer tries again
  }
  if (entry) {
    Object.assign(entry, { status: "failed", error: error.message });
    saveOutbox();
    renderMessages();
  }
  showError(friendly(error));
}

// ---------------------------------------------------------------------------------- conversations

function splitConversation(id) {
  const at = id.indexOf(":");
  return [id.slice(0, at), id.slice(at + 1)];
}

function titleOf(id) {
  const [kind, target] = splitConversation(id);
  if (kind === "group") return state.groups.get(target)?.name ?? state.conversations.find((c) => c.conversation_id === id)?.name ?? target;
  return target === state.user ? `${target} (note to self)` : target;
}

function isGroupGone(id) {
  const [kind, target] = splitConversation(id);
  return kind === "group" && !state.groups.has(target);
}

function refreshConversations() {
  state.refreshing = fetchConversations(++state.refreshes);
  return state.refreshing;
}

async function fetchConversations(ticket) {
  if (!state.token) return;
  const [list, groups] = await Promise.all([api("GET", "/v1/conversations?limit=200"), api("GET", "/v1/groups")]);
  // Refreshes overlap (a timer's and a member change's). An older answer that arrived last would
  // put back the members or names from before the change: the newest refresh answers for it. Its
  // failure is its own caller's to report, not this one's (a click handler without a catch).
  if (ticket !== state.refreshes) return state.refreshing?.catch(() => {});
  state.groups = new Map(groups.groups.map((g) => [g.group_id, g]));
  // A group the user left (or was removed from) stays in their stream, not in the list.
  state.conversations = list.conversations.filter((c) => !isGroupGone(c.conversation_id));
  if (state.open && !state.conversations.some((c) => c.conversation_id === state.open) && !isGroupGone(state.open)) {
    state.conversations.unshift({ conversation_id: state.open, name: null, last_message: null, unread_count: 0 });
  }
  renderConversations();
  renderHeader();
  renderMessages(); // group members may have changed the ticks
}

/** A refresh nobody asked for: skipped while offline (the next connection does it), and its
 * failure is no news to show. */
function refreshInBackground() {
  if (!navigator.onLine || !state.ready) return;
  refreshConversations().catch((error) => console.debug("refreshing the conversations failed:", error.message));
}

function previewOf(message) {
  if (!message) return "";
  if (message.content === null) return "(recalled)";
  const what = message.attachment ? `${message.attachment.content_type.startsWith("image/") ? "Photo" : "File"}: ${message.attachment.name}` : "";
  const text = message.content || what;
  const [kind] = splitConversation(conversationOf(message));
  if (message.from_user === state.user) return `You: ${text}`;
  return kind === "group" ? `${message.from_user}: ${text}` : text;
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const last = c.last_message;
    const unread = el("span", { className: "unread", testid: "unread", textContent: String(c.unread_count) });
    unread.hidden = c.unread_count === 0 || c.conversation_id === state.open;
    const when = last ? el("time", { className: "when", textContent: shortWhen(last.created_at) }) : "";
    const item = el("li", { testid: "conversation-item", dataset: { conversationId: c.conversation_id } },
      el("span", { className: "name", textContent: titleOf(c.conversation_id) }),
      when,
      el("span", { className: "preview", textContent: previewOf(last) }),
      unread);
    if (c.conversation_id === state.open) item.classList.add("open");
    item.addEventListener("click", () => openConversation(c.conversation_id));
    return item;
  }));
}

async function openConversation(id) {
  state.open = id;
  state.messages = new Map();
  state.olderBefore = null;
  state.showMembers = false;
  sessionStorage.setItem("mqchat.open", id);
  document.body.classList.add("in-conversation");
  $("conversation").hidden = false;
  $("conversation").dataset.conversationId = id;
  if (!state.conversations.some((c) => c.conversation_id === id)) {
    state.conversations.unshift({ conversation_id: id, name: null, last_message: null, unread_count: 0 });
  }
  const [kind, target] = splitConversation(id);
  watch(kind === "group" ? [`chat/group/${target}`] : target === state.user ? [] : [`chat/presence/${target}`]);
  renderConversations();
  renderHeader();
  renderMessages();
  let page;
  try {
    page = await api("GET", `/v1/conversations/${encodeURIComponent(id)}/messages?limit=${PAGE_SIZE}`);
  } catch (error) {
    showError(friendly(error));
    return;
  }
  if (state.open !== id) return;
  for (const message of page.messages) {
    if (!state.messages.has(message.server_msg_id)) state.messages.set(message.server_msg_id, message);
  }
  state.olderBefore = page.next_before_id;
  await loadReceipts(id);
  renderMessages();
  scrollToBottom();
  maybeMarkRead();
  $("composer-input")?.focus();
}

function closeConversation() {
  state.open = null;
  sessionStorage.removeItem("mqchat.open");
  document.body.classList.remove("in-conversation");
  $("conversation").hidden = true;
  delete $("conversation").dataset.conversationId;
  watch([]);
  renderConversations();
}

/** Scrolling back: the next older page, keeping what is on screen where it is. */
async function loadOlder() {
  const id = state.open;
  if (!id || state.olderBefore === null || state.loadingOlder) return;
  state.loadingOlder = true;
  try {
    const page = await api("GET", `/v1/conversations/${encodeURIComponent(id)}/messages?limit=${PAGE_SIZE}&before_id=${state.olderBefore}`);
    if (state.open !== id) return;
    const list = $("messages");
    const fromBottom = list.scrollHeight - list.scrollTop;
    for (const message of page.messages) {
      if (!state.messages.has(message.server_msg_id)) state.messages.set(message.server_msg_id, message);
    }
    state.olderBefore = page.next_before_id;
    renderMessages();
    list.scrollTop = list.scrollHeight - fromBottom;
  } catch (error) {
    showError(friendly(error));
  } finally {
    state.loadingOlder = false;
  }
}

/** Ticks for messages sent before the page loaded: receipts are watermarks, so the newest own
 * message's receipts give each recipient's marks. */
async function loadReceipts(id) {
  const own = [...state.messages.values()].filter((m) => m.from_user === state.user);
  if (own.length === 0) return;
  const newest = Math.max(...own.map((m) => m.server_msg_id));
  const { receipts } = await api("GET", `/v1/messages/${newest}/receipts`);
  for (const receipt of receipts) {
    if (receipt.delivered_at) raise(state.delivered, id, receipt.user_id, newest);
    if (receipt.read_at) raise(state.read, id, receipt.user_id, newest);
  }
}

function recipientsOf(id) {
  const [kind, target] = splitConversation(id);
  if (kind === "user") return target === state.user ? [] : [target];
  return (state.groups.get(target)?.members ?? []).filter((u) => u !== state.user);
}

function statusOf(message, id) {
  const recipients = recipientsOf(id);
  if (recipients.length === 0) return "sent";
  const mark = (marks, u) => marks[id]?.[u] ?? 0;
  const read = (u) => mark(state.read, u) >= message.server_msg_id;
  const delivered = (u) => read(u) || mark(state.delivered, u) >= message.server_msg_id; // read implies it
  if (recipients.every(read)) return "read";
  if (recipients.every(delivered)) return "delivered";
  return "sent";
}

// ---------------------------------------------------------------------------------- groups

async function onGroupUpdated(event) {
  const me = event.user_id === state.user;
  const gone = me && (event.action === "member_removed" || event.action === "member_left");
  const name = state.groups.get(event.group_id)?.name ?? "the group";
  if (gone) {
    state.groups.delete(event.group_id);
    if (state.open === `group:${event.group_id}`) closeConversation();
    if (event.by !== state.user) showError(`${event.by} removed you from ${name}.`);
  }
  later("refresh", 100, refreshInBackground);
}

async function changeMembers(action, user) {
  const [, groupId] = splitConversation(state.open);
  try {
    if (action === "add") await api("POST", `/v1/groups/${groupId}/members`, { user_id: user });
    else await api("DELETE", `/v1/groups/${groupId}/members/${encodeURIComponent(user)}`);
  } catch (error) {
    showError(friendly(error));
    return;
  }
  if (action === "leave") closeConversation();
  await refreshConversations();
}

function renderMembers() {
  const panel = $("members");
  const [kind, groupId] = state.open ? splitConversation(state.open) : [null, null];
  const group = kind === "group" ? state.groups.get(groupId) : null;
  panel.hidden = !group || !state.showMembers;
  if (!group) return;
  const owner = group.owner === state.user;
  const items = group.members.map((user) => {
    const item = el("li", { testid: "member", dataset: { user } },
      el("span", { textContent: user === state.user ? `${user} (you)` : user }),
      user === group.owner ? el("span", { className: "role", textContent: "owner" }) : "");
    if (owner && user !== state.user) {
      const remove = el("button", { type: "button", className: "link", testid: "member-remove", textContent: "Remove", title: `Remove ${user}` });
      remove.addEventListener("click", () => changeMembers("remove", user));
      item.append(remove);
    }
    return item;
  });
  $("member-list").replaceChildren(...items);
  $("member-add").hidden = !owner;
  $("leave-group").hidden = owner; // the owner can neither leave nor be removed
}

// ---------------------------------------------------------------------------------- typing and presence

function onTyping(event) {
  if (event.from_user === state.user) return;
  const conversation = event.group_id ? `group:${event.group_id}` : `user:${event.from_user}`;
  const who = state.typing.get(conversation) ?? new Map();
  if (event.state === "started") who.set(event.from_user, Date.now() + TYPING_SHOWN_MS);
  else who.delete(event.from_user);
  state.typing.set(conversation, who);
  renderHeader();
  later(`typing-${conversation}`, TYPING_SHOWN_MS, renderHeader);
}

function stopTypingOf(conversation, user) {
  state.typing.get(conversation)?.delete(user);
  renderHeader();
}

function typingTarget(id) {
  const [kind, target] = splitConversation(id);
  return kind === "group" ? { group_id: target } : { to_user: target };
}

function typed() {
  const id = state.open;
  if (!id || id === `user:${state.user}`) return;
  if (state.typingSent !== id) {
    stopTyping();
    if (publish({ type: "typing", state: "started", ...typingTarget(id) })) state.typingSent = id;
  }
  later("typing-idle", TYPING_IDLE_MS, stopTyping);
}

function stopTyping() {
  clearTimeout(state.timers["typing-idle"]);
  if (state.typingSent) publish({ type: "typing", state: "stopped", ...typingTarget(state.typingSent) });
  state.typingSent = null;
}

function presenceText(user) {
  const seen = state.presence.get(user);
  if (!seen) return "";
  if (seen.status === "online") return "online";
  return seen.last_seen ? `last seen ${dayLabel(seen.last_seen).toLowerCase()} at ${clock(seen.last_seen)}` : "offline";
}

function renderHeader() {
  const id = state.open;
  if (!id) return;
  $("conversation-title").textContent = titleOf(id);
  const [kind, target] = splitConversation(id);
  const now = Date.now();
  const typing = [...(state.typing.get(id) ?? new Map()).entries()].filter(([, until]) => until > now).map(([u]) => u);
  let status;
  if (typing.length) {
    status = kind === "group" ? `${typing.join(", ")} ${typing.length > 1 ? "are" : "is"} typing…` : "typing…";
  } else if (kind === "group") {
    const members = state.groups.get(target)?.members ?? [];
    status = members.length ? `${members.length} members` : "";
  } else {
    status = presenceText(target);
  }
  const line = $("conversation-status");
  line.textContent = status;
  line.classList.toggle("typing", typing.length > 0);
  line.classList.toggle("online", !typing.length && status === "online");
  $("members-toggle").hidden = kind !== "group";
  renderMembers();
}

// ---------------------------------------------------------------------------------- rendering

const TICKS = { pending: "sending…", failed: "failed", sent: "\u2713", delivered: "\u2713\u2713", read: "\u2713\u2713" };

function localDay(iso) {
  const d = new Date(iso);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}

function clock(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function dayLabel(iso) {
  const day = localDay(iso);
  if (day === localDay(new Date().toISOString())) return "Today";
  if (day === localDay(new Date(Date.now() - 86400000).toISOString())) return "Yesterday";
  const d = new Date(iso);
  const sameYear = d.getFullYear() === new Date().getFullYear();
  return d.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short", ...(sameYear ? {} : { year: "numeric" }) });
}

function shortWhen(iso) {
  return localDay(iso) === localDay(new Date().toISOString()) ? clock(iso) : dayLabel(iso);
}

function attachmentNode(attachment) {
  if (attachment.content_type.startsWith("image/")) {
    const img = el("img", { alt: attachment.name, testid: "attachment-preview" });
    if (attachment.width && attachment.height) {
      const scale = Math.min(1, 240 / attachment.width, 240 / attachment.height);
      img.width = Math.max(1, Math.round(attachment.width * scale));
      img.height = Math.max(1, Math.round(attachment.height * scale));
    }
    fileUrl(attachment.id, true).then((url) => { img.src = url; }).catch(() => { img.alt = `${attachment.name} (unavailable)`; });
    const button = el("button", { type: "button", className: "image", testid: "attachment-image", title: attachment.name }, img);
    button.addEventListener("click", () => view(attachment));
    return button;
  }
  const link = el("a", { href: "#", className: "file", testid: "attachment-file", textContent: `${attachment.name} · ${formatSize(attachment.size)}` });
  link.addEventListener("click", (event) => {
    event.preventDefault();
    download(attachment);
  });
  return link;
}

async function download(attachment) {
  try {
    const url = await fileUrl(attachment.id);
    const a = el("a", { href: url, download: attachment.name });
    document.body.append(a);
    a.click();
    a.remove();
  } catch (error) {
    showError(friendly(error));
  }
}

async function view(attachment) {
  try {
    const url = await fileUrl(attachment.id);
    $("viewer-image").src = url;
    $("viewer-image").alt = attachment.name;
    $("viewer-name").textContent = attachment.name;
    $("viewer-download").onclick = () => download(attachment);
    $("viewer").hidden = false;
  } catch (error) {
    showError(friendly(error));
  }
}

function messageItem({ message, mine, status, showName, pending }) {
  const recalled = message.content === null;
  const item = el("li", { className: "message", testid: "message", dataset: { status: status ?? "", from: message.from_user, id: message.server_msg_id ? String(message.server_msg_id) : "" } });
  if (mine) item.classList.add("mine");
  if (showName) item.append(el("span", { className: "from", testid: "message-from", textContent: message.from_user }));
  if (!recalled && message.attachment) item.append(attachmentNode(message.attachment));
  const text = recalled ? "(message recalled)" : message.content;
  const body = el("span", { className: recalled ? "text recalled" : "text", testid: "message-text", textContent: text });
  body.hidden = !text;
  item.append(body);
  const meta = el("span", { className: "meta" });
  const time = el("time", { testid: "message-time", dateTime: message.created_at, textContent: clock(message.created_at), title: new Date(message.created_at).toLocaleString() });
  meta.append(time);
  if (status) meta.append(el("span", { className: `ticks ${status}`, testid: "ticks", textContent: TICKS[status], title: status }));
  const window = (state.config?.recall_window_seconds ?? 0) * 1000;
  if (mine && !pending && !recalled && Date.now() - Date.parse(message.created_at) < window) {
    const button = el("button", { type: "button", className: "link recall", testid: "recall", textContent: "Recall", title: "Recall this message for everyone" });
    button.addEventListener("click", () => recall(message.server_msg_id));
    meta.append(button);
    recallEnds = Math.min(recallEnds, Date.parse(message.created_at) + window);
  }
  item.append(meta);
  return item;
}

let recallEnds = Infinity; // when the first Recall button shown must go

function renderMessages() {
  const id = state.open;
  if (!id) return;
  recallEnds = Infinity;
  const list = $("messages");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 20;
  const [kind] = splitConversation(id);
  const stored = [...state.messages.values()].sort((a, b) => a.server_msg_id - b.server_msg_id);
  const rows = stored.map((m) => ({ message: m, pending: false }));
  for (const entry of state.outbox.filter((e) => e.conversation_id === id)) {
    rows.push({
      pending: true,
      message: { from_user: state.user, content: entry.content, attachment: entry.attachment ?? null, created_at: entry.created_at ?? new Date().toISOString() },
      status: entry.status, error: entry.error,
    });
  }
  const items = [];
  if (state.olderBefore !== null) {
    const more = el("li", { className: "older" }, el("button", { type: "button", className: "link", testid: "load-older", textContent: "Earlier messages" }));
    more.firstChild.addEventListener("click", loadOlder);
    items.push(more);
  } else if (olderGone(stored)) {
    items.push(el("li", { className: "gap", testid: "history-gap", textContent: OLDER_GONE }));
  }
  let lastDay = null;
  let lastFrom = null;
  for (const row of rows) {
    const m = row.message;
    const day = localDay(m.created_at);
    if (day !== lastDay) {
      items.push(el("li", { className: "day", testid: "day-separator", textContent: dayLabel(m.created_at) }));
      lastDay = day;
      lastFrom = null;
    }
    const mine = m.from_user === state.user;
    // Names only where they help: in a group, on the first of a run of someone else's messages.
    const showName = kind === "group" && !mine && lastFrom !== m.from_user;
    const status = row.pending ? row.status : mine ? statusOf(m, id) : null;
    const item = messageItem({ message: m, mine, status, showName, pending: row.pending });
    if (row.error) item.title = row.error;
    items.push(item);
    lastFrom = m.from_user;
  }
  for (const upload of state.uploads.filter((u) => u.conversation_id === id)) {
    items.push(el("li", { className: "message mine uploading", testid: "uploading", textContent: `Sending ${upload.name}…` }));
  }
  list.replaceChildren(...items);
  if (atBottom) list.scrollTop = list.scrollHeight;
  if (recallEnds !== Infinity) later("recall-window", Math.max(500, recallEnds - Date.now() + 50), renderMessages);
}

function scrollToBottom() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

/** Read is what the user can see: an open conversation in a visible page. */
function maybeMarkRead() {
  const id = state.open;
  if (!id || document.visibilityState !== "visible" || !state.ready) return;
  const theirs = [...state.messages.values()].filter((m) => m.from_user !== state.user).map((m) => m.server_msg_id);
  if (theirs.length === 0) return;
  const newest = Math.max(...theirs);
  if (newest <= (state.readUpTo[id] ?? 0)) return;
  if (publish({ type: "mark_as_read", message_id: newest })) {
    state.readUpTo[id] = newest;
    const entry = state.conversations.find((c) => c.conversation_id === id);
    if (entry) entry.unread_count = 0;
    renderConversations();
  }
}

// ---------------------------------------------------------------------------------- wiring

async function startChat(peer) {
  if (!ID_RE.test(peer)) return showError("A user name has 1 to 64 letters, digits, '_', '.' or '-'.");
  if (peer !== state.user) {
    try {
      await api("GET", `/v1/users/${encodeURIComponent(peer)}`); // refused at once, not at the first send
    } catch (error) {
      return showError(error.code === "unknown_user" ? `There is no user called ${peer}.` : friendly(error));
    }
  }
  $("new-chat").reset();
  openConversation(`user:${peer}`);
}

function wire() {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    const form = event.target;
    try {
      await login(form.user.value.trim(), form.password.value);
      form.password.value = "";
    } catch (error) {
      showError(error instanceof ApiError ? friendly(error) : String(error));
    }
  });
  $("logout").addEventListener("click", () => logout());
  $("new-chat").addEventListener("submit", (event) => {
    event.preventDefault();
    startChat(event.target.peer.value.trim());
  });
  $("new-group").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const members = form.members.value.split(",").map((m) => m.trim()).filter(Boolean);
    try {
      const group = await api("POST", "/v1/groups", { name: form.name.value.trim(), members });
      form.reset();
      await refreshConversations();
      openConversation(`group:${group.group_id}`);
    } catch (error) {
      showError(friendly(error));
    }
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = event.target.text;
    if (input.value && state.open) send(input.value);
    input.value = "";
  });
  $("composer-input").addEventListener("input", (event) => (event.target.value ? typed() : stopTyping()));
  $("composer-input").addEventListener("blur", stopTyping);
  $("attach-input").addEventListener("change", (event) => {
    const files = [...event.target.files];
    event.target.value = "";
    if (files.length && state.open) sendFiles(files);
  });
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 40) loadOlder();
  });
  $("back").addEventListener("click", closeConversation);
  $("members-toggle").addEventListener("click", () => {
    state.showMembers = !state.showMembers;
    renderMembers();
  });
  $("member-add").addEventListener("submit", (event) => {
    event.preventDefault();
    const user = event.target.user.value.trim();
    if (!ID_RE.test(user)) return showError("A user name has 1 to 64 letters, digits, '_', '.' or '-'.");
    event.target.reset();
    changeMembers("add", user);
  });
  $("leave-group").addEventListener("click", () => changeMembers("leave", state.user));
  $("viewer-close").addEventListener("click", () => { $("viewer").hidden = true; });
  $("error").addEventListener("click", clearError);
  document.addEventListener("visibilitychange", maybeMarkRead);
  window.addEventListener("offline", () => setStatus("offline"));
  window.addEventListener("online", () => state.mqtt && setStatus(state.ready ? "online" : "reconnecting"));
  setInterval(() => state.ready && flushOutbox(true), 5000);
  setInterval(renderHeader, 30000); // "last seen" and typing indicators age
}

async function main() {
  wire();
  state.device = await claimDevice();
  const session = saved.get("mqchat.session", null);
  if (!session) {
    $("login").hidden = false;
    return;
  }
  try {
    state.user = session.user;
    state.token = session.token;
    await refreshToken(); // checks the saved token and extends it; brings the event key
    await start(session.user, state.token, state.eventKey);
  } catch (error) {
    if (state.token) showError(`Cannot start: ${friendly(error)}`);
  }
}

main();
