"use strict";
// The mqchat browser page. It speaks the protocol of docs/protocol.md: HTTP for logging in, the
// conversation list and history; MQTT over WebSocket (MQTT.js) for everything live. What it
// keeps in localStorage: the device id, the login (user, token and event key), and per user and
// device the cursor (the last stream seq processed) and the outbox (messages not yet
// acknowledged). Events on the stream and device topics count only with the server's "sig"
// (origin.js): a forged one must not take the place of a real one.

const RETRYABLE = new Set(["server_busy", "storage_unavailable", "rate_limited"]);
const RESEND_AFTER_MS = 15000;
const ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;

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

/** One device id per browser profile, kept: the server keeps one delivery cursor per device. */
function deviceId() {
  let id = localStorage.getItem("mqchat.device");
  if (!id) {
    id = `web-${randomHex(8)}`;
    localStorage.setItem("mqchat.device", id);
  }
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

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (response.status === 401 && state.token) {
    logout("Your session has ended: log in again.");
  }
  if (!response.ok) {
    throw new ApiError(response.status, data?.error?.code ?? "http_error", data?.error?.message ?? response.statusText);
  }
  return data;
}

// ---------------------------------------------------------------------------------- UI helpers

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
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
  const device = deviceId();
  const token = await api("POST", "/v1/token", { user_id: user, password, device_id: device });
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
  });
  setStatus("offline");
  $("chat").hidden = true;
  $("logout").hidden = true;
  $("me").textContent = "";
  $("login").hidden = false;
  if (message) showError(message);
}

/** One tab per browser profile: two tabs would share a device id and take its connection from
 * each other (one connection per MQTT client id). */
function holdTabLock() {
  if (!navigator.locks) return Promise.resolve(true);
  return new Promise((resolve) => {
    navigator.locks.request("mqchat-tab", { ifAvailable: true }, (lock) => {
      resolve(lock !== null);
      return lock === null ? undefined : new Promise(() => {}); // held while the page lives
    });
  });
}

async function start(user, token, eventKey) {
  Object.assign(state, { user, token, device: deviceId() });
  await useEventKey(eventKey);
  state.cursor = saved.get(key("cursor"), 0);
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
  Object.assign(state, { catchingUp: true, firstPage: true, syncing: false, acked: 0 });
  const topics = { [streamTopic()]: { qos: 1 }, [deviceTopic()]: { qos: 1 } };
  client.subscribe(topics, (error, granted) => {
    if (error || granted.some((g) => g.qos === 128)) {
      showError(`the server refused the subscription: ${error?.message ?? "SUBACK 0x80"}`);
      return;
    }
    state.ready = true;
    setStatus("online");
    flushOutbox();
    maybeMarkRead();
  });
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
    receive([event]); // typing events (no seq) are not shown by this page
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
    later("refresh", 300, refreshConversations);
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
  publish({ type: "sync_messages", since_seq: state.cursor, limit: 200 });
  later("sync-timeout", 10000, () => { state.syncing = false; });
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
      };
      if (message.from_user === state.user) dropFromOutbox(message.client_msg_id);
      if (conversationOf(message) === state.open) {
        state.messages.set(message.server_msg_id, message);
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
      if (message) Object.assign(message, { content: null, recalled_at: event.recalled_at });
      break;
    }
    default: // group_updated: the conversation list refresh picks it up
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

function send(content) {
  const entry = {
    client_msg_id: `web-${randomHex(12)}`, conversation_id: state.open, content, status: "pending", sent_at: null,
  };
  state.outbox.push(entry);
  saveOutbox();
  sendEntry(entry);
  renderMessages();
}

function dropFromOutbox(clientMsgId) {
  const index = state.outbox.findIndex((e) => e.client_msg_id === clientMsgId);
  if (index < 0) return null;
  const [entry] = state.outbox.splice(index, 1);
  saveOutbox();
  return entry;
}

function onMessageAck(ack) {
  const entry = dropFromOutbox(ack.client_msg_id);
  if (entry && entry.conversation_id === state.open && !state.messages.has(ack.server_msg_id)) {
    const [kind, target] = splitConversation(entry.conversation_id);
    state.messages.set(ack.server_msg_id, {
      server_msg_id: ack.server_msg_id, client_msg_id: ack.client_msg_id, from_user: state.user,
      to_user: kind === "user" ? target : null, group_id: kind === "group" ? target : null,
      content: entry.content, msg_type: "text", created_at: ack.created_at, recalled_at: null,
    });
  }
  renderMessages();
  later("refresh", 300, refreshConversations);
}

function onErrorEvent(error) {
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
  showError(`${error.code}: ${error.message}`);
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

async function refreshConversations() {
  if (!state.token) return;
  const [list, groups] = await Promise.all([api("GET", "/v1/conversations?limit=200"), api("GET", "/v1/groups")]);
  state.groups = new Map(groups.groups.map((g) => [g.group_id, g]));
  state.conversations = list.conversations;
  if (state.open && !state.conversations.some((c) => c.conversation_id === state.open)) {
    state.conversations.unshift({ conversation_id: state.open, name: null, last_message: null, unread_count: 0 });
  }
  renderConversations();
  renderMessages(); // group members may have changed the ticks
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const last = c.last_message;
    const preview = !last ? "" : last.content === null ? "(recalled)" : `${last.from_user}: ${last.content}`;
    const unread = el("span", { className: "unread", testid: "unread", textContent: String(c.unread_count) });
    unread.hidden = c.unread_count === 0 || c.conversation_id === state.open;
    const item = el("li", { testid: "conversation-item", dataset: { conversationId: c.conversation_id } },
      el("span", { className: "name", textContent: titleOf(c.conversation_id) }),
      el("span", { className: "preview", textContent: preview }),
      unread);
    if (c.conversation_id === state.open) item.classList.add("open");
    item.addEventListener("click", () => openConversation(c.conversation_id));
    return item;
  }));
}

async function openConversation(id) {
  state.open = id;
  state.messages = new Map();
  sessionStorage.setItem("mqchat.open", id);
  $("conversation").hidden = false;
  $("conversation-title").textContent = titleOf(id);
  $("conversation").dataset.conversationId = id;
  if (!state.conversations.some((c) => c.conversation_id === id)) {
    state.conversations.unshift({ conversation_id: id, name: null, last_message: null, unread_count: 0 });
  }
  renderConversations();
  renderMessages();
  const page = await api("GET", `/v1/conversations/${encodeURIComponent(id)}/messages?limit=100`);
  if (state.open !== id) return;
  for (const message of page.messages) {
    if (!state.messages.has(message.server_msg_id)) state.messages.set(message.server_msg_id, message);
  }
  await loadReceipts(id);
  renderMessages();
  maybeMarkRead();
  $("composer-input")?.focus();
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

const TICKS = { pending: "\u{1F551}", failed: "failed", sent: "\u2713", delivered: "\u2713\u2713", read: "\u2713\u2713" };

function messageItem({ from, text, status, mine, id, recalled }) {
  const body = el("span", { className: recalled ? "text recalled" : "text", testid: "message-text", textContent: text });
  const item = el("li", { testid: "message", dataset: { status: status ?? "", from, id: id ?? "" } });
  if (mine) item.classList.add("mine");
  item.append(el("span", { className: "from", textContent: from }), body);
  if (status) {
    const ticks = el("span", { className: `ticks ${status}`, testid: "ticks", textContent: TICKS[status], title: status });
    item.append(ticks);
  }
  return item;
}

function renderMessages() {
  const id = state.open;
  if (!id) return;
  const list = $("messages");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 20;
  const stored = [...state.messages.values()].sort((a, b) => a.server_msg_id - b.server_msg_id);
  const items = stored.map((m) => {
    const mine = m.from_user === state.user;
    return messageItem({
      from: m.from_user, mine, id: String(m.server_msg_id), recalled: m.content === null,
      text: m.content ?? "(message recalled)", status: mine ? statusOf(m, id) : null,
    });
  });
  for (const entry of state.outbox.filter((e) => e.conversation_id === id)) {
    const item = messageItem({ from: state.user, mine: true, text: entry.content, status: entry.status });
    if (entry.error) item.title = entry.error;
    items.push(item);
  }
  list.replaceChildren(...items);
  if (atBottom) list.scrollTop = list.scrollHeight;
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

function wire() {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    const form = event.target;
    try {
      await login(form.user.value.trim(), form.password.value);
      form.password.value = "";
    } catch (error) {
      showError(error instanceof ApiError ? `${error.code}: ${error.message}` : String(error));
    }
  });
  $("logout").addEventListener("click", () => logout());
  $("new-chat").addEventListener("submit", (event) => {
    event.preventDefault();
    const peer = event.target.peer.value.trim();
    if (!ID_RE.test(peer)) return showError("a user id has 1-64 letters, digits, '_', '.' or '-'");
    event.target.reset();
    openConversation(`user:${peer}`);
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
      showError(`${error.code ?? "error"}: ${error.message}`);
    }
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = event.target.text;
    if (input.value && state.open) send(input.value);
    input.value = "";
  });
  $("error").addEventListener("click", clearError);
  document.addEventListener("visibilitychange", maybeMarkRead);
  window.addEventListener("offline", () => setStatus("offline"));
  window.addEventListener("online", () => state.mqtt && setStatus(state.ready ? "online" : "reconnecting"));
  setInterval(() => state.ready && flushOutbox(true), 5000);
}

async function main() {
  wire();
  if (!(await holdTabLock())) {
    showError("mqchat is already open in another tab of this browser: use that one.");
    return;
  }
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
    if (state.token) showError(`cannot start: ${error.message}`);
  }
}

main();
