// Load generator for bench/fanout.py (not meant to be run by hand).
//
// It speaks a line protocol with the driver: one JSON command per line on
// stdin, one JSON reply per line on stdout ({"ok": true, ...} or
// {"ok": false, "error": "..."}). Every wait is bounded by the command's
// `timeoutMs`; the process exits on "quit", on stdin's end, or after
// `--max-seconds` whatever happens, so it can never outlive the driver.
//
// The clients are the npm `ws` package's with its defaults: like a browser,
// they offer permessage-deflate (the server may refuse it).
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";
import WebSocket from "ws";

const args = process.argv.slice(2);
const maxSeconds = Number(args[args.indexOf("--max-seconds") + 1] || 600);
setTimeout(() => {
  process.stderr.write(`load.mjs: giving up after ${maxSeconds} s\n`);
  process.exit(3);
}, maxSeconds * 1000).unref();

let owner = null; // {ws, sessionID}
const members = []; // {ws, id, onPong}
let base = ""; // ws://127.0.0.1:PORT
let memberSeq = 0;

const reply = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function deadline(ms, what) {
  let timer;
  const promise = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return { promise, cancel: () => clearTimeout(timer) };
}

async function within(ms, what, work) {
  const d = deadline(ms, what);
  try {
    return await Promise.race([work, d.promise]);
  } finally {
    d.cancel();
  }
}

// Open a socket and resolve with {ws, openedAt, welcome} once the first
// non-keepalive message (the welcome) arrives.
function open(url, onMessage) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url); // perMessageDeflate offered by default
    let openedAt = 0;
    let welcomed = false;
    ws.on("open", () => { openedAt = performance.now(); });
    ws.on("unexpected-response", (_req, res) => reject(new Error(`HTTP ${res.statusCode} for ${url}`)));
    ws.on("error", (e) => { if (!welcomed) reject(e); });
    ws.on("close", (code) => { if (!welcomed) reject(new Error(`closed ${code} before the welcome`)); });
    ws.on("message", (data) => {
      const now = performance.now();
      const msg = JSON.parse(data.toString());
      if (!welcomed) {
        if (msg.type === "keepalive") return;
        welcomed = true;
        resolve({ ws, openedAt, welcome: msg });
        return;
      }
      onMessage(msg, now);
    });
  });
}

// What the fan-out round waits for: `remaining` members still to receive
// message `type` about `memberID`.
let pending = null;

function memberHandler(m) {
  return (msg, now) => {
    if (msg.type === "pong") {
      m.onPong?.();
      return;
    }
    const p = pending;
    if (p && msg.type === p.type && msg.memberID === p.memberID) {
      if (p.times) p.times.push(now);
      if (--p.remaining === 0) p.resolve();
    }
  };
}

async function connectMember(sessionID) {
  const id = `m${process.pid}-${memberSeq++}`;
  const m = { id, ws: null, onPong: null };
  const { ws, welcome } = await open(`${base}/sessions/${sessionID}/join?userID=${id}`, memberHandler(m));
  if (welcome.type !== "session_joined") throw new Error(`expected session_joined, got ${welcome.type}`);
  m.ws = ws;
  ws.on("error", () => {});
  return m;
}

async function cmdOwner(c) {
  base = c.base;
  const { ws, welcome } = await within(c.timeoutMs, "owner welcome",
    open(`${base}/sessions/${c.batchID}?userID=${c.ownerID}`, () => {}));
  if (welcome.type !== "session_created") throw new Error(`expected session_created, got ${welcome.type}`);
  ws.on("error", () => {});
  owner = { ws, sessionID: welcome.sessionID };
  return { sessionID: welcome.sessionID, extensions: ws.extensions };
}

// Grow the session to `count` members, `concurrency` handshakes in flight.
async function cmdMembers(c) {
  const started = performance.now();
  const target = c.count;
  const inFlight = { n: 0 };
  const work = (async () => {
    const workers = [];
    for (let w = 0; w < c.concurrency; w++) {
      workers.push((async () => {
        while (members.length + inFlight.n < target) {
          inFlight.n++;
          try {
            members.push(await connectMember(owner.sessionID));
          } finally {
            inFlight.n--;
          }
        }
      })());
    }
    await Promise.all(workers);
  })();
  await within(c.timeoutMs, `${target} members connected`, work);
  return { members: members.length, seconds: (performance.now() - started) / 1000 };
}

// Expect every member to receive `type` about `memberID`; returns the wait.
function expect(type, memberID, times, timeoutMs) {
  let resolve;
  const done = new Promise((r) => { resolve = r; });
  pending = { type, memberID, remaining: members.length, times, resolve };
  if (members.length === 0) resolve();
  return {
    wait: () => within(timeoutMs, `every member's ${type} about ${memberID}`, done)
      .finally(() => { pending = null; }),
  };
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

// `rounds` times: one more member joins; record, for every member, the delay
// from the joiner's `open` to that member's member_joined; then the joiner
// leaves and we wait until every member got member_left.
async function cmdFanout(c) {
  const delays = [];
  let negative = 0;
  const started = performance.now();
  for (let r = 0; r < c.rounds; r++) {
    if (performance.now() - started > c.timeoutMs) throw new Error(`fan-out rounds took over ${c.timeoutMs} ms`);
    const id = `j${process.pid}-${memberSeq++}`;
    const times = [];
    const joined = expect("member_joined", id, times, c.roundTimeoutMs);
    // The server sends the 101 before it fans out member_joined, so `open` is
    // the earliest moment a member can hear of the join.
    const ws = new WebSocket(`${base}/sessions/${owner.sessionID}/join?userID=${id}`);
    ws.on("error", () => {});
    const opened = new Promise((resolve) => ws.once("open", () => resolve(performance.now())));
    await joined.wait();
    const openedAt = await within(c.roundTimeoutMs, "joiner open", opened);
    for (const t of times) {
      const d = t - openedAt;
      if (d < 0) negative++;
      delays.push(d);
    }
    const left = expect("member_left", id, null, c.roundTimeoutMs);
    ws.close();
    await left.wait();
  }
  delays.sort((a, b) => a - b);
  return {
    rounds: c.rounds,
    samples: delays.length,
    negative,
    p50_ms: percentile(delays, 50),
    p99_ms: percentile(delays, 99),
    max_ms: delays[delays.length - 1],
    seconds: (performance.now() - started) / 1000,
  };
}

// Every member sends `pings` pings, one outstanding at a time.
async function cmdPing(c) {
  const started = performance.now();
  let pongs = 0;
  const one = (m) => new Promise((resolve, reject) => {
    let left = c.pings;
    m.onPong = () => {
      pongs++;
      if (--left === 0) { m.onPong = null; resolve(); return; }
      m.ws.send('{"type":"ping"}', (e) => e && reject(e));
    };
    m.ws.send('{"type":"ping"}', (e) => e && reject(e));
  });
  try {
    await within(c.timeoutMs, "pongs", Promise.all(members.map(one)));
  } finally {
    for (const m of members) m.onPong = null;
  }
  return { pongs, seconds: (performance.now() - started) / 1000 };
}

// The owner leaves first: the server then closes every member itself, which
// costs it one message per member instead of a member_left fan-out per leave.
async function cmdCloseAll(c) {
  const all = [...(owner ? [owner.ws] : []), ...members.map((m) => m.ws)];
  members.length = 0;
  owner = null;
  const closed = all.map((ws) => new Promise((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) return resolve();
    ws.once("close", resolve);
  }));
  if (all.length) all[0].close();
  try {
    await within(c.timeoutMs, "every socket closed", Promise.all(closed));
  } catch {
    for (const ws of all) ws.terminate();
    return { closed: all.length, terminated: true };
  }
  return { closed: all.length, terminated: false };
}

const commands = { owner: cmdOwner, members: cmdMembers, fanout: cmdFanout, ping: cmdPing, closeAll: cmdCloseAll };

const rl = createInterface({ input: process.stdin });
let queue = Promise.resolve();
rl.on("line", (line) => {
  queue = queue.then(async () => {
    const c = JSON.parse(line);
    if (c.cmd === "quit") process.exit(0);
    try {
      reply({ ok: true, ...(await commands[c.cmd](c)) });
    } catch (e) {
      reply({ ok: false, error: String(e && e.message || e) });
    }
  });
});
rl.on("close", () => queue.then(() => process.exit(0)));
