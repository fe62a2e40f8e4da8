// meteredrt WebRTC demo: two pages join one room with the official SDK's
// MeteredPeer, open a data channel and say hello both ways.
//
// Query parameters:
//   url   the meteredrt origin (the SDK appends /v1), default ws://127.0.0.1:8080
//   key   a publishable key whose actions include "send" (WebRTC signalling
//         travels as direct messages), or
//   token a JWT minted by your backend (POST /v1/tokens, meteredrt token mint)
//   room  the channel to join, default "demo/webrtc"
//
// Progress is shown on the page and mirrored in `window.demo` so a test can
// poll it: {peerId, remoteId, channel, sent, received, candidatePair, done,
// error}.

(function () {
  "use strict";

  const params = new URLSearchParams(location.search);
  const url = params.get("url") || "ws://127.0.0.1:8080";
  const room = params.get("room") || "demo/webrtc";
  const key = params.get("key");
  const token = params.get("token");

  const demo = (window.demo = {
    peerId: null,
    remoteId: null,
    channel: null,
    sent: null,
    received: null,
    candidatePair: null,
    done: false,
    error: null,
  });

  const $ = (id) => document.getElementById(id);

  function show(id, text, tone) {
    const element = $(id);
    element.textContent = text;
    if (tone) {
      element.classList.remove("ok", "wait", "bad");
      element.classList.add(tone);
    }
  }

  function toneOf(state) {
    if (state === "connected" || state === "joined" || state === "open") return "ok";
    if (state === "closed" || state === "failed") return "bad";
    return "wait";
  }

  function logMessage(direction, text) {
    const item = document.createElement("li");
    item.className = direction === "sent" ? "out" : "in";
    const arrow = document.createElement("span");
    arrow.className = "dir";
    arrow.textContent = direction === "sent" ? "→ out" : "← in";
    item.append(arrow, " ", text);
    $("messages").append(item);
  }

  function fail(message) {
    demo.error = message;
    show("result", message, null);
    $("result").className = "result bad";
  }

  function checkDone() {
    if (demo.sent !== null && demo.received !== null && !demo.done) {
      demo.done = true;
      show("result", "✓ Message sent and received over the data channel", null);
      $("result").className = "result ok";
    }
  }

  // The candidate pair ICE settled on. window.demo.candidatePair keeps each
  // end as {type, protocol, address, port}; address is null when Chromium
  // hides host addresses behind mDNS names (it does unless the page may use
  // the camera or microphone), but the type and port still tell the story.
  async function showCandidatePair(pc) {
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((report) => {
      if (report.type === "transport" && report.selectedCandidatePairId) {
        pair = stats.get(report.selectedCandidatePairId);
      }
    });
    if (!pair) return;
    const local = stats.get(pair.localCandidateId);
    const remote = stats.get(pair.remoteCandidateId);
    const end = (c) => ({
      type: c.candidateType,
      protocol: c.protocol,
      address: c.address || null,
      port: c.port,
    });
    const describe = (c) =>
      `${c.type}/${c.protocol} ${c.address ? `${c.address}:${c.port}` : `port ${c.port}`}`;
    if (local && remote) {
      demo.candidatePair = { local: end(local), remote: end(remote) };
      show(
        "candidate-pair",
        `${describe(demo.candidatePair.local)} ⇄ ${describe(demo.candidatePair.remote)}`,
        null,
      );
    }
  }

  function useChannel(channel, remote) {
    const { DataChannel } = window.MeteredPeer;
    const wrapped = new DataChannel(channel);
    const hello = () => {
      demo.channel = "open";
      show("channel-state", `open (${channel.label})`, "ok");
      const text = `hello from ${demo.peerId}`;
      wrapped.send(JSON.stringify({ text })).then(
        () => {
          demo.sent = text;
          logMessage("sent", text);
          checkDone();
          showCandidatePair(remote.pc).catch(() => {});
        },
        (err) => fail(`data channel send failed: ${err.message}`),
      );
    };
    wrapped.on("message", ({ data }) => {
      const text = JSON.parse(data).text;
      demo.received = text;
      logMessage("received", text);
      checkDone();
    });
    wrapped.on("close", () => show("channel-state", "closed", "bad"));
    wrapped.on("error", ({ err }) => fail(`data channel error: ${err.message}`));
    if (wrapped.readyState === "open") {
      hello();
    } else {
      show("channel-state", channel.readyState, "wait");
      wrapped.on("open", hello);
    }
  }

  function start() {
    show("server", url, null);
    show("room", room, null);
    if (!window.MeteredPeer) {
      fail("The SDK did not load: put its dist/index.umd.js at sdk/index.umd.js");
      return;
    }
    if (!key && !token) {
      fail("Add ?key=pk_live_… (or ?token=…) to the address");
      return;
    }
    const { MeteredPeer } = window.MeteredPeer;
    const options = { url };
    if (token) {
      options.tokenProvider = async () => token;
    } else {
      options.apiKey = key;
    }
    const peer = new MeteredPeer(options);
    window.peer = peer;

    peer.on("state-change", ({ to }) => show("signalling", to, toneOf(to)));
    peer.on("error", ({ err }) => fail(`SDK error: ${err.message}`));
    peer.on("joined", ({ peerId }) => {
      demo.peerId = peerId;
      show("peer-id", peerId, null);
    });
    peer.on("peer-joined", ({ peer: remote }) => {
      if (demo.remoteId !== null) return; // the demo pairs exactly two pages
      demo.remoteId = remote.id;
      show("remote-id", remote.id, null);
      show("remote-state", remote.state, toneOf(remote.state));
      // The SDK configures each connection with welcome.metadata.iceServers.
      const servers = remote.pc.getConfiguration().iceServers || [];
      show(
        "ice-servers",
        servers.length ? `${servers.length} from the welcome` : "none: host candidates only",
        null,
      );
      remote.on("state-change", ({ to }) => show("remote-state", to, toneOf(to)));
      remote.on("data-channel", ({ channel }) => useChannel(channel, remote));
      // One side opens the channel; the impolite one, so each pair of
      // pages agrees without talking about it first.
      if (!remote.polite) {
        useChannel(remote.pc.createDataChannel("chat"), remote);
      } else {
        show("channel-state", "waiting for the remote to open it", "wait");
      }
    });
    peer.on("peer-left", ({ peer: remote }) => {
      if (remote.id === demo.remoteId) show("remote-state", "left", "bad");
    });

    peer.join(room).catch((err) => fail(`join failed: ${err.name}: ${err.message}`));
  }

  start();
})();
