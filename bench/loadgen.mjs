// Load generator for the meteredrt benchmark; bench/run.py drives it.
//
//   node loadgen.mjs <settings.json>
//
// The settings file gives the scenario, the server URL, the minted tokens
// and the bounds. The generator speaks the raw protocol (JSON text frames)
// over `ws`, and talks to run.py in lines of JSON on stdout:
//   {"event":"ready"}      connections are set up; waits for "go" on stdin
//   {"event":"result",...} the measured phase is over
//   {"event":"holding"}    (idle) connections are open; waits for "close"
// Every phase has a deadline, and the whole process exits by itself after
// settings.hardTimeoutS whatever happens.
//
// With settings.urls (a cluster: one URL per node) connection i of a group
// goes to urls[(i + offset) % urls.length]; the fan-out's subscribers are
// spread over every node, its publishers (and the wildcard scenario's noise
// subscriptions) sit on the first one, each ping-pong pair has its two ends
// on two different nodes, and the join storm's joiners are spread over every
// node; idle connections all go to the first node (whose RSS is measured).

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { performance } from 'node:perf_hooks';
import WebSocket from 'ws';

const settings = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const now = () => performance.now();

const hardTimer = setTimeout(() => {
  emit({ event: 'error', message: `hard timeout after ${settings.hardTimeoutS} s` });
  process.exit(3);
}, settings.hardTimeoutS * 1000);
hardTimer.unref();

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(message) {
  emit({ event: 'error', message });
  process.exit(2);
}

const stdinLines = createInterface({ input: process.stdin });
const waiting = [];
stdinLines.on('line', (line) => {
  const w = waiting.shift();
  if (w) w(line.trim());
});
function nextCommand() {
  return new Promise((resolve) => waiting.push(resolve));
}

// -- connections ---------------------------------------------------------

const errors = { closes: 0, errorFrames: 0, firstError: null };

// The server URL of connection i of a group (see the header).
function urlFor(i, offset = 0) {
  const urls = settings.urls ?? [settings.url];
  return urls[(i + offset) % urls.length];
}

// Open one connection and resolve when its welcome arrives.
function connect(token, onFrame, url = settings.url) {
  return new Promise((resolve, reject) => {
    const started = now();
    const ws = new WebSocket(`${url}/v1?token=${token}`, { perMessageDeflate: false });
    let welcomed = false;
    const timer = setTimeout(() => reject(new Error('no welcome within 20 s')), 20000);
    ws.on('message', (data) => {
      if (!welcomed) {
        welcomed = true;
        clearTimeout(timer);
        const text = data.toString();
        if (!text.includes('"welcome"')) {
          reject(new Error(`first frame was not a welcome: ${text.slice(0, 200)}`));
          return;
        }
        resolve({ ws, connectMs: now() - started });
        return;
      }
      onFrame(ws, data);
    });
    ws.on('close', (code, reason) => {
      clearTimeout(timer);
      if (!welcomed) reject(new Error(`closed before welcome: ${code} ${reason}`));
      else if (!closing) {
        errors.closes += 1;
        errors.firstError ??= `closed ${code} ${reason}`;
      }
    });
    ws.on('error', (e) => {
      clearTimeout(timer);
      if (!welcomed) reject(e);
    });
  });
}

// Open many connections with at most `inFlight` handshakes at a time.
// `urlOf(i)` places connection i (all on settings.url by default);
// `afterOpen(i, ws)`, if given, is awaited before the worker opens its next one.
async function connectMany(tokens, inFlight, onFrameFor, { urlOf = () => settings.url, afterOpen } = {}) {
  const results = new Array(tokens.length);
  let next = 0;
  async function worker() {
    while (next < tokens.length) {
      const i = next++;
      results[i] = await connect(tokens[i], onFrameFor(i), urlOf(i));
      if (afterOpen) await afterOpen(i, results[i].ws);
    }
  }
  await Promise.all(Array.from({ length: Math.min(inFlight, tokens.length) }, worker));
  return results;
}

let closing = false;
function closeAll(sockets) {
  closing = true;
  for (const s of sockets) s.terminate();
}

// A client-side copy of the server's per-connection bucket (every frame but ping), so the
// benchmark never trips the server's rate limit; `waits` says whether it
// capped the offered load.
class Bucket {
  constructor(rate, burst) {
    this.rate = rate;
    this.burst = burst;
    this.tokens = burst;
    this.last = now();
    this.waits = 0;
  }
  take() {
    const t = now();
    this.tokens = Math.min(this.burst, this.tokens + ((t - this.last) / 1000) * this.rate);
    this.last = t;
    if (this.tokens >= 1) {
      this.tokens -= 1;
      return true;
    }
    this.waits += 1;
    return false;
  }
  msUntilToken() {
    return Math.max(1, ((1 - this.tokens) / this.rate) * 1000);
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length));
  return Math.round(sorted[i] * 1000) / 1000;
}

function latencySummary(samples) {
  const sorted = Float64Array.from(samples).sort();
  return { p50_ms: percentile(sorted, 50), p99_ms: percentile(sorted, 99), latency_samples: sorted.length };
}

function frameError(data) {
  const text = data.toString();
  if (text.includes('"type":"error"')) {
    errors.errorFrames += 1;
    errors.firstError ??= text.slice(0, 200);
    return true;
  }
  return false;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Send a subscribe on `ws` and resolve when `acks` (connection index ->
// resolver, fed by the connection's frame handler) sees its ack.
function subscribeAndWait(acks, i, ws, channel) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no subscribe ack within 60 s')), 60000);
    acks.set(i, () => {
      clearTimeout(timer);
      resolve();
    });
    ws.send(JSON.stringify({ type: 'subscribe', channel, requestId: 'j' }));
  });
}

// A frame handler for connection i that resolves its pending subscribe (see subscribeAndWait).
const ackHandler = (acks) => (i) => (ws, data) => {
  if (frameError(data)) return;
  const resolve = acks.get(i);
  if (resolve && data.toString().includes('"type":"ack"')) {
    acks.delete(i);
    resolve();
  }
};

// Subscribe `patterns` (wildcards that match nothing published) over as many
// connections as needed, at most `perConnection` each, and wait for every ack.
async function subscribeNoise(tokens, patterns, perConnection = 90) {
  const needed = Math.ceil(patterns.length / perConnection);
  if (needed > tokens.length) fail(`need ${needed} noise tokens, have ${tokens.length}`);
  const acked = [];
  const conns = await connectMany(tokens.slice(0, needed), 10, (i) => (ws, data) => {
    if (!frameError(data) && data.toString().includes('"type":"ack"')) acked[i] = (acked[i] || 0) + 1;
  });
  const waits = conns.map(({ ws }, i) => {
    const mine = patterns.slice(i * perConnection, (i + 1) * perConnection);
    mine.forEach((channel, k) => ws.send(JSON.stringify({ type: 'subscribe', channel, requestId: `n${k}` })));
    return mine.length;
  });
  const deadline = now() + 30000;
  while (waits.some((n, i) => (acked[i] || 0) < n)) {
    if (now() > deadline) fail('noise subscriptions not acknowledged within 30 s');
    await sleep(10);
  }
  return conns;
}

// -- fan-out ---------------------------------------------------------------

async function fanout() {
  const { subscribers, publishers, channel, payloadBytes, window, probeEvery, durationS, maxPublishes } =
    settings;
  const subTokens = settings.tokens.slice(0, subscribers);
  const pubTokens = settings.tokens.slice(subscribers, subscribers + publishers);
  let received = 0;
  let lastReceivedAt = 0;
  const sentAt = new Map(); // seq -> performance.now() at publish
  const latencies = [];

  const onSubscriberFrame = (i) => {
    const probe = i % probeEvery === 0;
    return (ws, data) => {
      // Only probes parse frames: the generator shares two cores with the server.
      if (data.length > 40 && data[9] === 0x6d /* {"type":"m */) {
        received += 1;
        lastReceivedAt = now();
        if (probe) {
          const text = data.toString('latin1');
          const at = text.indexOf('"s":');
          const seq = parseInt(text.slice(at + 4, at + 16), 10);
          const t0 = sentAt.get(seq);
          if (t0 !== undefined) latencies.push(lastReceivedAt - t0);
        }
      } else if (frameError(data)) {
        ws.emit('meteredrt-error', data.toString().slice(0, 200));
      } else if (data.toString().includes('"type":"ack"')) {
        ws.emit('meteredrt-ack');
      }
    };
  };
  const subs = await connectMany(subTokens, 100, onSubscriberFrame, { urlOf: (i) => urlFor(i) });
  const subscribeStarted = now();
  // At most 20 (subscribesInFlight) subscribes in flight: set-up, not measured. A cluster node
  // answers each with the channel's snapshot (one Redis round trip whose
  // reply grows with the channel), and on a loaded machine a few still miss
  // the node's Redis deadline: those are retried (at most 5 times, 1 s
  // apart) and counted.
  let subscribeRetries = 0;
  const trySubscribe = ({ ws }) =>
    new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no subscribe ack within 60 s')), 60000);
      ws.once('meteredrt-ack', () => {
        clearTimeout(t);
        resolve();
      });
      ws.once('meteredrt-error', (text) => {
        clearTimeout(t);
        reject(new Error(`subscribe refused: ${text}`));
      });
      ws.send(JSON.stringify({ type: 'subscribe', channel, requestId: 's' }));
    });
  const subscribeOne = async (sub) => {
    for (let attempt = 0; ; attempt++) {
      try {
        return await trySubscribe(sub);
      } catch (e) {
        if (attempt >= 5 || !String(e).includes('backend_error')) throw e;
        subscribeRetries += 1;
        await sleep(1000);
      }
    }
  };
  let nextSub = 0;
  await Promise.all(
    Array.from({ length: Math.min(settings.subscribesInFlight ?? 20, subs.length) }, async () => {
      while (nextSub < subs.length) await subscribeOne(subs[nextSub++]);
    }),
  );
  const subscribeDone = now();
  // The refused attempts are counted in subscribe_retries, not as errors of the measured phase.
  errors.errorFrames = 0;
  errors.firstError = null;
  const pubs = await connectMany(pubTokens, 10, () => (ws, data) => frameError(data), { urlOf: () => urlFor(0) });
  const buckets = pubs.map(() => new Bucket(settings.ratePerConnection, settings.burstPerConnection));
  // The wildcard scenario's noise: held on the publishers' node.
  const noisePatterns = settings.noisePatterns ?? [];
  const noise = await subscribeNoise(settings.tokens.slice(subscribers + publishers), noisePatterns);

  emit({
    event: 'ready',
    connections: subs.length + pubs.length + noise.length,
    subscribe_ms: Math.round(subscribeDone - subscribeStarted),
    subscribe_retries: subscribeRetries,
    noise_patterns: noisePatterns.length,
  });
  if ((await nextCommand()) !== 'go') fail('expected go');

  // A payload of exactly payloadBytes bytes of JSON: {"s":<seq>,"p":"xx…"}.
  const padFor = (seq) => 'x'.repeat(Math.max(0, payloadBytes - JSON.stringify({ s: seq, p: '' }).length));
  const started = now();
  const deadline = started + durationS * 1000;
  let published = 0;
  let next = 0;
  // Publish while fewer than `window` publishes are undelivered, spread
  // over the publisher connections in turn, each under its rate bucket.
  while (published < maxPublishes && now() < deadline) {
    if (published * subscribers - received >= window * subscribers) {
      await sleep(0);
      continue;
    }
    let sent = false;
    for (let k = 0; k < pubs.length; k++) {
      const j = (next + k) % pubs.length;
      if (buckets[j].take()) {
        const seq = published;
        const frame = `{"type":"publish","channel":"${channel}","data":{"s":${seq},"p":"${padFor(seq)}"}}`;
        sentAt.set(seq, now());
        pubs[j].ws.send(frame);
        published += 1;
        next = j + 1;
        sent = true;
        break;
      }
    }
    if (!sent) await sleep(Math.min(...buckets.map((b) => b.msUntilToken())));
    else if (published % 8 === 0) await sleep(0); // let the socket flush and frames arrive
  }
  const publishEnded = now();
  // Drain: wait (bounded) for the deliveries still on their way.
  const drainDeadline = now() + 10000;
  while (received < published * subscribers && now() < drainDeadline) await sleep(5);
  const elapsed = ((received >= published * subscribers ? lastReceivedAt : now()) - started) / 1000;
  emit({
    event: 'result',
    publishes: published,
    deliveries: received,
    expected_deliveries: published * subscribers,
    deliveries_per_s: Math.round(received / elapsed),
    publish_phase_s: Math.round((publishEnded - started)) / 1000,
    measured_s: Math.round(elapsed * 1000) / 1000,
    publisher_connections: pubs.length,
    rate_capped_waits: buckets.reduce((a, b) => a + b.waits, 0),
    ...latencySummary(latencies),
    ...errors,
  });
  closeAll([...subs, ...pubs, ...noise].map((c) => c.ws));
}

// -- direct ping-pong ---------------------------------------------------

async function pingpong() {
  const { pairs, durationS, maxRoundTrips } = settings;
  const aTokens = settings.tokens.slice(0, pairs);
  const bTokens = settings.tokens.slice(pairs, 2 * pairs);
  const latencies = [];
  let roundTrips = 0;
  let running = false;
  let deadline = 0;
  let inFlight = 0;
  let resolveDone;
  const done = new Promise((r) => (resolveDone = r));
  const buckets = [];
  const aSockets = [];

  // B echoes every direct back to its A; A measures and sends the next.
  const bs = await connectMany(bTokens, 100, (i) => (ws, data) => {
    if (frameError(data)) return;
    const text = data.toString();
    const at = text.indexOf('"data":');
    ws.send(`{"type":"send","to":"pa${i}","data":${text.slice(at + 7, text.lastIndexOf('}'))}}`);
  }, { urlOf: (i) => urlFor(i, 1) });
  const sendPing = (i) => {
    const bucket = buckets[i];
    if (!bucket.take()) {
      setTimeout(() => sendPing(i), bucket.msUntilToken());
      return;
    }
    inFlight += 1;
    aSockets[i].send(`{"type":"send","to":"pb${i}","data":{"t":${now()}}}`);
  };
  const as = await connectMany(aTokens, 100, (i) => (ws, data) => {
    if (frameError(data)) return;
    const text = data.toString();
    const at = text.indexOf('"t":');
    const t0 = parseFloat(text.slice(at + 4));
    inFlight -= 1;
    latencies.push(now() - t0);
    roundTrips += 1;
    if (running && roundTrips < maxRoundTrips && now() < deadline) sendPing(i);
    else if (inFlight === 0) resolveDone();
  }, { urlOf: (i) => urlFor(i) });
  for (let i = 0; i < pairs; i++) {
    aSockets.push(as[i].ws);
    // B replies once per round trip too, so one bucket per A covers both.
    buckets.push(new Bucket(settings.ratePerConnection, settings.burstPerConnection));
  }

  emit({ event: 'ready', connections: as.length + bs.length });
  if ((await nextCommand()) !== 'go') fail('expected go');
  const started = now();
  deadline = started + durationS * 1000;
  running = true;
  for (let i = 0; i < pairs; i++) sendPing(i);
  await Promise.race([done, sleep(durationS * 1000 + 10000)]);
  running = false;
  const elapsed = (now() - started) / 1000;
  emit({
    event: 'result',
    round_trips: roundTrips,
    round_trips_per_s: Math.round(roundTrips / elapsed),
    measured_s: Math.round(elapsed * 1000) / 1000,
    rate_capped_waits: buckets.reduce((a, b) => a + b.waits, 0),
    ...latencySummary(latencies),
    ...errors,
  });
  closeAll([...as, ...bs].map((c) => c.ws));
}

// -- join storm ----------------------------------------------------------------

// Every connection connects, subscribes to one channel and waits for its ack;
// `inFlight` at a time, spread over the nodes of a cluster. Measures the whole
// set-up, from the first upgrade to the last ack.
async function joinstorm() {
  const { connections, inFlight, channel } = settings;
  emit({ event: 'ready', connections: 0 });
  if ((await nextCommand()) !== 'go') fail('expected go');
  const acks = new Map();
  const started = now();
  const ackLatencies = [];
  const opened = await connectMany(settings.tokens.slice(0, connections), inFlight, ackHandler(acks), {
    urlOf: (i) => urlFor(i),
    afterOpen: async (i, ws) => {
      const t0 = now();
      await subscribeAndWait(acks, i, ws, channel);
      ackLatencies.push(now() - t0);
    },
  });
  const elapsed = (now() - started) / 1000;
  const sorted = Float64Array.from(ackLatencies).sort();
  emit({
    event: 'result',
    subscribers: opened.length,
    subscribers_per_s: Math.round(opened.length / elapsed),
    setup_s: Math.round(elapsed * 1000) / 1000,
    measured_s: Math.round(elapsed * 1000) / 1000,
    handshakes_in_flight: inFlight,
    p50_ms: percentile(sorted, 50),
    p99_ms: percentile(sorted, 99),
    ...errors,
  });
  closeAll(opened.map((c) => c.ws));
}

// -- idle connections ---------------------------------------------------------

async function idle() {
  const { connections, inFlight, subscribeEach } = settings;
  emit({ event: 'ready', connections: 0 });
  if ((await nextCommand()) !== 'go') fail('expected go');
  const started = now();
  // With `subscribeEach`, every connection then subscribes to a channel of
  // its own (the prefix and its index) and waits for the ack.
  const acks = new Map();
  const opened = await connectMany(settings.tokens.slice(0, connections), inFlight, ackHandler(acks), {
    afterOpen: subscribeEach ? (i, ws) => subscribeAndWait(acks, i, ws, `${subscribeEach}${i}`) : undefined,
  });
  const elapsed = (now() - started) / 1000;
  emit({
    event: 'result',
    connections: opened.length,
    connects_per_s: Math.round(opened.length / elapsed),
    measured_s: Math.round(elapsed * 1000) / 1000,
    handshakes_in_flight: inFlight,
    ...latencySummary(opened.map((c) => c.connectMs)),
    ...errors,
  });
  if ((await nextCommand()) !== 'close') fail('expected close');
  closeAll(opened.map((c) => c.ws));
}

// -- Redis round trips per operation ------------------------------------
//
// Not a throughput figure: run.py reads Redis's INFO commandstats between
// the phases, each started by a command on stdin ("connect", "subscribe",
// "publish", "send", "close") and answered with {"event":"phase"} once
// every ack (and every delivery) of the phase has arrived.

async function roundtrips() {
  const { connections } = settings;
  let delivered = 0;
  let acked = 0;
  let wanted = 0;
  let phaseDone = null;
  const check = () => {
    if (phaseDone && acked >= wanted.acks && delivered >= wanted.deliveries) {
      const done = phaseDone;
      phaseDone = null;
      done();
    }
  };
  const phase = (acks, deliveries, start) =>
    new Promise((resolve, reject) => {
      acked = 0;
      delivered = 0;
      wanted = { acks, deliveries };
      const timer = setTimeout(() => reject(new Error(`phase stuck: ${acked}/${acks} acks, ${delivered}/${deliveries} deliveries`)), 20000);
      phaseDone = () => {
        clearTimeout(timer);
        resolve();
      };
      start();
      check();
    });
  const onFrame = () => (ws, data) => {
    if (frameError(data)) return;
    const text = data.toString();
    if (text.includes('"type":"ack"')) acked += 1;
    else if (text.includes('"type":"message"') || text.includes('"type":"direct"')) delivered += 1;
    check();
  };
  emit({ event: 'ready', connections: 0 });
  let sockets = [];
  for (;;) {
    const command = await nextCommand();
    const started = now();
    if (command === 'connect') {
      const opened = await connectMany(settings.tokens.slice(0, connections), 10, onFrame, { urlOf: (i) => urlFor(i) });
      sockets = opened.map((c) => c.ws);
    } else if (command === 'subscribe') {
      await phase(connections, 0, () =>
        sockets.forEach((ws, i) => ws.send(JSON.stringify({ type: 'subscribe', channel: `rt/c${i}`, requestId: 's' }))),
      );
    } else if (command === 'publish') {
      // Into the channel of the next connection: one receiver, on another node.
      await phase(connections, connections, () =>
        sockets.forEach((ws, i) =>
          ws.send(JSON.stringify({ type: 'publish', channel: `rt/c${(i + 1) % connections}`, data: i, requestId: 'p' })),
        ),
      );
    } else if (command === 'send') {
      await phase(connections, connections, () =>
        sockets.forEach((ws, i) =>
          ws.send(JSON.stringify({ type: 'send', to: `rt${(i + 1) % connections}`, data: i, requestId: 'd' })),
        ),
      );
    } else if (command === 'close') {
      closeAll(sockets);
      emit({ event: 'phase', name: command, ms: now() - started, ...errors });
      return;
    } else {
      fail(`unknown phase ${command}`);
    }
    emit({ event: 'phase', name: command, ms: now() - started, ...errors });
  }
}

const scenarios = { fanout, pingpong, idle, joinstorm, roundtrips };
try {
  await scenarios[settings.scenario]();
  emit({ event: 'finished' });
  setTimeout(() => process.exit(0), 200).unref();
  await sleep(300);
  process.exit(0);
} catch (e) {
  fail(String(e && e.stack ? e.stack : e));
}
