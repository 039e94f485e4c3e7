// Starts the Firestore emulator on the port given as the only argument and
// prints "ready <port>" once it listens. Stops on SIGTERM/SIGINT.
//
// The package's Listen handles one target per stream (it reads only the first
// ListenRequest and cannot remove a target); `multiplexedListen` below
// replaces it so that one stream carries many targets, as the Firestore Web
// SDK uses it. Each target is still served by the package's own per-target
// code (`state.v1Listen`), so a stream with one add_target behaves as before.
//
// The package answers any write anywhere by re-sending every query target's
// whole result (RESET, the documents, CURRENT, a NO_CHANGE). Real Firestore
// sends a target only what changed in it; `unchangedRoundsDropped` keeps a
// target's re-sent round only if its documents differ from the last round
// sent, so that hundreds of targets on one stream cost what they cost on
// Firestore, not hundreds of responses per write.
const path = require('path');
const { FirestoreServer } = require('@firestore-emulator/server');

// The generated protobuf module the server package itself uses (resolved from
// its directory, so it is the same copy even if npm ever nests it).
const firestoreProto = require(require.resolve('@firestore-emulator/proto/dist/google/firestore/v1/firestore', {
  paths: [path.dirname(require.resolve('@firestore-emulator/server'))],
}));
const { ListenResponse, TargetChangeTargetChangeType, UnimplementedFirestoreService } = firestoreProto;
const LISTEN = UnimplementedFirestoreService.definition.Listen;
const INVALID_ARGUMENT = 3;
const live = { streams: 0, targets: 0 }; // for the SIGUSR2 report

// A target's responses, with every RESET ... CURRENT round whose documents are
// those of the previous round dropped (with the NO_CHANGE that follows it).
function unchangedRoundsDropped(send) {
  let sent = null; // the documents of the last round sent, serialised
  let round = null; // the responses of the round being received, after a RESET
  let docs = [];
  let dropNoChange = false;
  const T = TargetChangeTargetChangeType;
  return (response) => {
    const change = response.has_target_change ? response.target_change : null;
    if (change && change.target_change_type === T.RESET) {
      round = [response];
      docs = [];
      return;
    }
    if (response.has_document_change) {
      docs.push(JSON.stringify(response.document_change.document.toObject()));
      if (round) {
        round.push(response);
        return;
      }
    }
    if (change && change.target_change_type === T.CURRENT) {
      const now = docs.slice().sort().join('\n');
      if (round && now === sent) {
        round = null;
        dropNoChange = true;
        return;
      }
      sent = now;
      if (round) round.forEach(send);
      round = null;
      docs = [];
    }
    if (change && change.target_change_type === T.NO_CHANGE && change.target_ids.length === 0 && dropNoChange) {
      dropNoChange = false;
      return;
    }
    send(response);
  };
}

function multiplexedListen(state, call) {
  const targets = new Map(); // target_id -> {live, cleanups}: the targets live on this stream
  let finished = false;
  live.streams += 1;

  // Never write on a finished call: the package's change handlers run after a
  // setImmediate, possibly after the client has gone.
  const write = (response) => {
    if (finished || call.cancelled || call.destroyed || !call.writable) return;
    try {
      call.write(response);
    } catch (err) {
      console.error('Listen: write failed:', err);
    }
  };
  const removed = (targetId, cause) => write(ListenResponse.fromObject({
    target_change: {
      target_change_type: TargetChangeTargetChangeType.REMOVE,
      target_ids: [targetId],
      ...(cause ? { cause } : {}),
    },
  }));

  const endTarget = (targetId) => {
    const target = targets.get(targetId);
    if (!target) return;
    targets.delete(targetId);
    live.targets -= 1;
    target.live = false;
    for (const cleanup of target.cleanups.splice(0)) {
      try {
        cleanup();
      } catch (err) {
        console.error(`Listen: cleanup of target ${targetId} failed:`, err);
      }
    }
  };

  const addTarget = (request) => {
    const targetId = request.add_target.target_id;
    if (targets.has(targetId)) {
      // A REMOVE with a cause means the target is gone, so the live one ends too.
      endTarget(targetId);
      removed(targetId, { code: INVALID_ARGUMENT, message: `Duplicate target ID ${targetId} on this stream` });
      return;
    }
    // One object per registration: a late handler of an ended target stays
    // silent even if its ID is added again.
    const target = { live: true, cleanups: [] };
    targets.set(targetId, target);
    live.targets += 1;
    try {
      state.v1Listen(
        request,
        unchangedRoundsDropped((response) => { if (target.live) write(response); }),
        (cleanup) => { if (target.live) target.cleanups.push(cleanup); else cleanup(); },
      );
    } catch (err) { // e.g. a query the emulator does not support (the package would have crashed)
      console.error(`Listen: target ${targetId} failed:`, err);
      endTarget(targetId);
      removed(targetId, { code: INVALID_ARGUMENT, message: String(err && err.message ? err.message : err) });
    }
  };

  const finish = () => {
    if (finished) return;
    finished = true;
    live.streams -= 1;
    for (const targetId of [...targets.keys()]) endTarget(targetId);
  };

  call.on('data', (request) => {
    if (finished) return;
    if (request.has_add_target) {
      addTarget(request);
    } else if (request.has_remove_target) {
      endTarget(request.remove_target);
      removed(request.remove_target); // acknowledged even if it was not live: removal is idempotent
    }
  });
  call.on('end', () => { // client half-close: no target can be added any more, so the call is done
    const open = !finished && !call.cancelled && !call.destroyed && call.writable;
    finish();
    if (open) call.end();
  });
  call.on('cancelled', finish);
  call.on('error', (err) => {
    if (!finished) console.error('Listen: stream error:', err && err.message);
    finish();
  });
  call.on('close', finish);
}

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node start.js <port>');
  process.exit(2);
}
const server = new FirestoreServer();
// Swap the Listen handler through grpc-js's public Server.unregister/register,
// using the method definition (path, serializers) the package registered it
// with: this needs neither the unexported FirestoreServiceV1Impl nor grpc-js's
// private handler map, and fails loudly if the package stops registering it.
if (!server.server.unregister(LISTEN.path)
    || !server.server.register(LISTEN.path, (call) => multiplexedListen(server.state, call),
      LISTEN.responseSerialize, LISTEN.requestDeserialize, 'bidi')) {
  console.error(`cannot replace the handler of ${LISTEN.path}`);
  process.exit(1);
}
server.start(port).then(() => console.log(`ready ${port}`));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
// A diagnostic for tests: on SIGUSR2 print what Listen holds, e.g.
// "listen-stats 3 streams=1 targets=2 create-document=2 update-document=2 delete-document=2"
// (the number counts the reports; the last three are the package's change listeners).
let reports = 0;
process.on('SIGUSR2', () => {
  const emitter = server.state.emitter;
  const events = ['create-document', 'update-document', 'delete-document']
    .map((event) => `${event}=${emitter.listenerCount(event)}`);
  reports += 1;
  console.log(`listen-stats ${reports} streams=${live.streams} targets=${live.targets} ${events.join(' ')}`);
});
