// quickstart.mjs: two peers, one message. An ES module (hence .mjs), for Node.js >= 20.
// In an empty directory:  npm install @metered-ca/realtime ws
// Then:                   node quickstart.mjs pk_live_…
// pk_live_… is the publishable key meteredrt printed on its first start
// (`.venv/bin/meteredrt keys list --app default`, run where the server runs, shows it again).
import { SignallingClient } from "@metered-ca/realtime";
import WebSocket from "ws";

const [apiKey, url = "ws://127.0.0.1:8080"] = process.argv.slice(2);
if (!apiKey?.startsWith("pk_live_")) {
  console.error("usage: node quickstart.mjs pk_live_… [ws://127.0.0.1:8080]");
  process.exit(2);
}
setTimeout(() => {
  console.error("no message within 10 s: is meteredrt running at " + url + "?");
  process.exit(1);
}, 10_000).unref();

const options = {
  url, // the SDK appends /v1 itself
  apiKey, // each connection with a publishable key gets a random peerId
  reconnect: false,
  // Node has no WebSocket of its own (browsers need no factory). The option keeps
  // ws from delivering several frames in one tick, which trips the SDK's join().
  webSocketFactory: (u) => new WebSocket(u, { allowSynchronousEvents: false }),
};
const alice = new SignallingClient(options);
const bob = new SignallingClient(options);
const received = new Promise((resolve) => alice.on("message", resolve));

try {
  await alice.connect();
  await bob.connect();
  await alice.subscribe("demo/room-7");
  await bob.publish("demo/room-7", { text: "hello" }); // a publisher never hears itself
  const { channel, from, data } = await received;
  console.log(`alice received ${JSON.stringify(data)} on ${channel} from ${from}`);
  await Promise.all([alice.close(), bob.close()]);
} catch (err) {
  console.error(`${err.message}: is meteredrt running at ${url}, and is the key right?`);
  process.exit(1);
}
