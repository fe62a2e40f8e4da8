// Scriptable driver for the official @metered-ca/realtime SDK, used by the
// functional tests (see tests/functional/node_harness.py).
//
// Usage: node sdk_client.mjs '<scenario JSON>'   or   node sdk_client.mjs scenario.json
//
// A scenario names one client (top-level options) or several (`clients`),
// then lists steps run strictly in order:
//
//   {"url": "ws://127.0.0.1:8080", "apiKey": "pk_live_...",
//    "steps": [{"op": "connect"}, {"op": "subscribe", "channel": "room"}]}
//
//   {"clients": {"a": {"url": ..., "token": "..."}, "b": {...}},
//    "steps": [{"op": "connect", "client": "a"}, ...]}
//
// Client options: url, apiKey | token (a string, or a list handed out one
// per connect attempt, the last repeating), reconnect (false by default;
// true for the SDK defaults, or a ReconnectOptions object),
// inactivityTimeoutMs, autoResubscribe, tokenProviderTimeoutMs,
// origin (sent as the Origin header), log (true prints SDK log lines).
//
// Every SDK event and every step outcome is one JSON object per stdout
// line, with `event`, `client` and `at` (epoch ms) keys; the last line is
// {"event": "done"}. A step that the SDK rejects is an observation, not a
// failure: it prints {"event": "step", "ok": false, "error": {...}} and the
// scenario goes on. The exit status is 1 only for a broken scenario or an
// exception the driver did not expect ({"event": "fatal"} says which).

import { readFileSync } from "node:fs";
import { SignallingClient } from "@metered-ca/realtime";
import WebSocket from "ws";

const SDK_EVENTS = [
  "connected",
  "disconnected",
  "state-change",
  "message",
  "direct",
  "presence",
  "server-error",
  "going-away",
  "token-provider-error",
];

const DEFAULT_WAIT_MS = 10_000;

function emit(event, fields = {}) {
  // `event` is written last so a payload field can never shadow it.
  process.stdout.write(
    JSON.stringify({ ...fields, at: Date.now(), event }) + "\n",
  );
}

function describeError(err) {
  if (!(err instanceof Error)) {
    return { name: typeof err, message: String(err) };
  }
  const out = { name: err.name, message: err.message };
  for (const key of ["code", "closeCode", "closeReason", "size", "cap"]) {
    if (err[key] !== undefined) out[key] = err[key];
  }
  return out;
}

function jsonSafe(payload) {
  // token-provider-error carries an Error, which JSON.stringify flattens to {}.
  const out = {};
  for (const [key, value] of Object.entries(payload ?? {})) {
    out[key] = value instanceof Error ? describeError(value) : value;
  }
  return out;
}

function loadScenario(arg) {
  if (arg === undefined) {
    throw new Error("usage: node sdk_client.mjs <scenario JSON | path>");
  }
  const text = arg.trimStart().startsWith("{") ? arg : readFileSync(arg, "utf8");
  const scenario = JSON.parse(text);
  if (!Array.isArray(scenario.steps)) {
    throw new Error("scenario.steps must be a list");
  }
  return scenario;
}

function matches(payload, where) {
  if (!where) return true;
  return Object.entries(where).every(
    ([key, value]) => JSON.stringify(payload[key]) === JSON.stringify(value),
  );
}

// One SDK client plus everything it has emitted, so `wait` can count events
// that arrived before the wait began.
class Driven {
  constructor(name, options) {
    this.name = name;
    this.peerId = null;
    this.seen = [];
    this.waiters = new Set();
    this.client = new SignallingClient(this.sdkOptions(options));
    for (const event of SDK_EVENTS) {
      this.client.on(event, (payload) => this.record(event, payload));
    }
  }

  sdkOptions(options) {
    const sdk = {
      url: options.url,
      webSocketFactory: (url) =>
        options.origin === undefined
          ? new WebSocket(url)
          : new WebSocket(url, { origin: options.origin }),
    };
    if (options.apiKey !== undefined) sdk.apiKey = options.apiKey;
    if (options.token !== undefined) {
      const tokens = [].concat(options.token);
      let next = 0;
      sdk.tokenProvider = async () => tokens[Math.min(next++, tokens.length - 1)];
    }
    if (options.reconnect === undefined || options.reconnect === false) {
      sdk.reconnect = false;
    } else if (options.reconnect !== true) {
      sdk.reconnect = options.reconnect;
    }
    for (const key of ["inactivityTimeoutMs", "autoResubscribe", "tokenProviderTimeoutMs"]) {
      if (options[key] !== undefined) sdk[key] = options[key];
    }
    if (options.log) {
      const line = (level) => (msg, ctx) =>
        emit("log", { client: this.name, level, msg, ctx });
      sdk.logger = {
        debug: line("debug"),
        info: line("info"),
        warn: line("warn"),
        error: line("error"),
      };
    }
    return sdk;
  }

  record(event, payload) {
    if (event === "connected") this.peerId = payload.peerId;
    this.seen.push({ event, payload });
    emit(event, { ...jsonSafe(payload), client: this.name });
    for (const waiter of this.waiters) waiter();
  }

  count(event, where) {
    return this.seen.filter((e) => e.event === event && matches(e.payload, where)).length;
  }

  // Resolves once `count` matching events have been seen in total.
  waitFor(event, count, where, timeoutMs) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const seen = this.count(event, where);
        if (seen < count) return false;
        this.waiters.delete(check);
        clearTimeout(timer);
        resolve({ seen });
        return true;
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        const err = new Error(
          `saw ${this.count(event, where)} of ${count} '${event}' events within ${timeoutMs}ms`,
        );
        err.name = "TimeoutError";
        reject(err);
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }
}

function buildClients(scenario) {
  const specs = scenario.clients ?? { default: scenario };
  const clients = new Map();
  for (const [name, options] of Object.entries(specs)) {
    clients.set(name, new Driven(name, options));
  }
  if (clients.size === 0) throw new Error("scenario defines no client");
  return clients;
}

function resolvePeer(to, clients) {
  if (typeof to === "string") return to;
  if (to && typeof to.peerIdOf === "string") {
    const other = clients.get(to.peerIdOf);
    if (!other) throw new Error(`unknown client '${to.peerIdOf}' in send.to`);
    if (other.peerId === null) throw new Error(`client '${to.peerIdOf}' has no peerId yet`);
    return other.peerId;
  }
  throw new Error("send.to must be a peerId string or {\"peerIdOf\": <client>}");
}

// Returns a promise for the step's result fields; throws synchronously
// (before any promise) only for a malformed step.
function startStep(step, driven, clients) {
  const client = driven.client;
  switch (step.op) {
    case "connect":
      return client.connect().then(() => ({ peerId: driven.peerId }));
    case "subscribe": {
      const opts = {};
      if (step.includeSenderMetadata !== undefined) {
        opts.includeSenderMetadata = step.includeSenderMetadata;
      }
      return client.subscribe(step.channel, opts).then(() => ({}));
    }
    case "unsubscribe":
      return client.unsubscribe(step.channel).then(() => ({}));
    case "publish":
      return client.publish(step.channel, step.data).then(() => ({}));
    case "send":
      return client.send(resolvePeer(step.to, clients), step.data).then(() => ({}));
    case "wait":
      if (typeof step.event !== "string") throw new Error("wait.event must be a string");
      return driven.waitFor(
        step.event,
        step.count ?? 1,
        step.where,
        step.timeoutMs ?? DEFAULT_WAIT_MS,
      );
    case "sleepMs":
      return new Promise((resolve) => setTimeout(() => resolve({}), step.ms ?? 0));
    case "state":
      return Promise.resolve({ state: client.state });
    case "close":
      return client.close(step.code, step.reason).then(() => ({}));
    default:
      throw new Error(`unknown step op '${step.op}'`);
  }
}

async function run(scenario) {
  const clients = buildClients(scenario);
  const defaultName = clients.keys().next().value;
  const detached = [];
  for (const [index, step] of scenario.steps.entries()) {
    const name = step.client ?? defaultName;
    const driven = clients.get(name);
    if (!driven) throw new Error(`step ${index}: unknown client '${name}'`);
    const report = { index, op: step.op, client: name };
    const outcome = startStep(step, driven, clients).then(
      (fields) => emit("step", { ...fields, ...report, ok: true }),
      (err) => emit("step", { ...report, ok: false, error: describeError(err) }),
    );
    if (step.noWait) {
      detached.push(outcome);
    } else {
      await outcome;
    }
  }
  await Promise.all(detached);
  // The SDK's heartbeat timers keep Node alive until every client is closed.
  for (const driven of clients.values()) {
    if (driven.client.state !== "closed") await driven.client.close();
  }
}

function fatal(err) {
  emit("fatal", { error: { ...describeError(err), stack: err?.stack } });
  process.exit(1);
}

process.on("uncaughtException", fatal);
process.on("unhandledRejection", fatal);

try {
  await run(loadScenario(process.argv[2]));
} catch (err) {
  fatal(err);
}
emit("done");
process.exit(0);
