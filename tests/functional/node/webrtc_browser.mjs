// Two headless Chromium pages run the WebRTC demo (examples/webrtc) against
// a meteredrt server and must exchange a data-channel message both ways over
// loopback. Run by tests/functional/webrtc_session.py inside a network
// namespace whose only interface is lo.
//
// Usage: node webrtc_browser.mjs '<options JSON>'
//
//   {"chromium": "/usr/bin/chromium",
//    "page": "http://127.0.0.1:PORT/index.html",   the demo, served statically
//    "url": "ws://127.0.0.1:PORT",                 the meteredrt origin
//    "key": "pk_live_...", "room": "webrtc/room-1",
//    "timeoutMs": 30000,
//    "screenshots": ["/path/a.png", "/path/b.png"]}  one per page
//
// The browser is Debian's chromium driven by playwright-core with
// executablePath: never a downloaded browser. It runs headless, sandbox-free,
// with background networking off, in a fresh profile directory that is
// removed afterwards.
//
// ICE on loopback only: Chromium gathers 127.0.0.1/::1 host candidates only
// with --allow-loopback-in-peer-connection, and gives a page its local
// addresses (rather than only the default-route interface, which a
// loopback-only namespace lacks, or mDNS names) only when the page may
// capture media. So this script, not the demo page, grants the demo's origin
// the microphone (a fake device, no prompt) and opens it once in an init
// script; WebRtcHideLocalIpsWithMdns is disabled so that the selected pair's
// addresses are visible in getStats().
//
// Prints one JSON object per line, each with `event` and `at` (epoch ms):
//   {"event": "launched", "version"}      the browser started
//   {"event": "console", "page", "type", "text"}   page console errors/warnings
//   {"event": "pageerror", "page", "message"}      uncaught page exceptions
//   {"event": "page", "page", "demo", "microphone"}   a page's window.demo
//                                         at the end, and "granted" or the
//                                         getUserMedia error
//   {"event": "screenshot", "page", "path"}
//   {"event": "done"}                     both pages sent, received and
//                                         reported their candidate pair
// and {"event": "fatal", "error"} with exit status 1 when the pages did not
// finish within timeoutMs (screenshots are still taken) or anything broke.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

// playwright-core 1.65.1 passes --disable-features=<this list> itself, and
// Chromium honours only the last --disable-features switch: repeat the list
// (chromiumSwitches.ts, `disabledFeatures`) so adding one feature keeps them.
const PLAYWRIGHT_DISABLED_FEATURES = [
  "AvoidUnnecessaryBeforeUnloadCheckSync",
  "DestroyProfileOnBrowserClose",
  "HttpsUpgrades",
  "HttpsFirstBalancedModeAutoEnable",
  "LensOverlay",
  "MediaRouter",
  "PaintHolding",
  "ThirdPartyStoragePartitioning",
  "AvoidCorsURLLoaderRestartOnRedirect",
  "TcpPortRandomizationWin",
  "OptimizationHints",
  "NetworkTimeServiceQuerying",
  "AimEnabled",
  "PreconnectToSearch",
  "msForceBrowserSignIn",
  "msEdgeUpdateLaunchServicesPreferredVersion",
];

const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--allow-loopback-in-peer-connection",
  "--use-fake-ui-for-media-stream",
  "--use-fake-device-for-media-stream",
  `--disable-features=${[...PLAYWRIGHT_DISABLED_FEATURES, "WebRtcHideLocalIpsWithMdns"].join(",")}`,
];

// Runs in each page before the demo's scripts: opens the (fake) microphone
// once, as a page that captures media would, and keeps the stream. The
// demo's first RTCPeerConnection comes only after the welcome, the join and
// the presence snapshot. The outcome is reported as the page's `microphone`.
function openMicrophone() {
  window.testMicrophone = navigator.mediaDevices
    .getUserMedia({ audio: true })
    .then((stream) => ((window.testMicrophoneStream = stream), "granted"))
    .catch((err) => `${err.name}: ${err.message}`);
}

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ ...fields, at: Date.now(), event }) + "\n");
}

function describeError(err) {
  return err instanceof Error
    ? { name: err.name, message: err.message, stack: err.stack }
    : { name: typeof err, message: String(err) };
}

async function demoState(page) {
  return page.evaluate(() => window.demo ?? null).catch(() => null);
}

async function run(options, profile) {
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: options.chromium,
    headless: true,
    args: FLAGS,
    viewport: { width: 1000, height: 760 },
  });
  try {
    emit("launched", { version: context.browser()?.version() ?? null });
    await context.grantPermissions(["microphone"], { origin: new URL(options.page).origin });
    await context.addInitScript(openMicrophone);
    const query = new URLSearchParams({ url: options.url, key: options.key, room: options.room });
    const names = ["a", "b"];
    const pages = [];
    for (const name of names) {
      // A persistent context starts with one blank page: use it first.
      const page = context.pages()[pages.length] ?? (await context.newPage());
      page.on("console", (message) => {
        if (message.type() === "error" || message.type() === "warning") {
          emit("console", { page: name, type: message.type(), text: message.text() });
        }
      });
      page.on("pageerror", (err) => emit("pageerror", { page: name, message: err.message }));
      await page.goto(`${options.page}?${query}`);
      pages.push(page);
    }
    const finished = (page) =>
      page.waitForFunction(
        () => window.demo && ((window.demo.done && window.demo.candidatePair) || window.demo.error),
        null,
        {
          timeout: options.timeoutMs ?? 30_000,
          polling: 100,
        },
      );
    let failure = null;
    try {
      await Promise.all(pages.map(finished));
    } catch (err) {
      failure = err;
    }
    const states = [];
    for (const [index, page] of pages.entries()) {
      const demo = await demoState(page);
      states.push(demo);
      const microphone = await page.evaluate(() => window.testMicrophone).catch(() => null);
      emit("page", { page: names[index], demo, microphone });
      const path = options.screenshots?.[index];
      if (path) {
        await page.screenshot({ path, fullPage: true });
        emit("screenshot", { page: names[index], path });
      }
    }
    if (failure !== null) throw failure;
    const errors = states.filter((demo) => demo?.error);
    if (errors.length) throw new Error(`a page reported: ${errors.map((d) => d.error).join("; ")}`);
    emit("done");
  } finally {
    await context.close();
  }
}

const profile = mkdtempSync(join(tmpdir(), "meteredrt-chromium-"));
let status = 0;
try {
  const options = JSON.parse(process.argv[2] ?? "");
  await run(options, profile);
} catch (err) {
  emit("fatal", { error: describeError(err) });
  status = 1;
} finally {
  rmSync(profile, { recursive: true, force: true });
}
process.exit(status);
