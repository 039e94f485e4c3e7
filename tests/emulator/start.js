// Starts the Firestore emulator on the port given as the only argument and
// prints "ready <port>" once it listens. Stops on SIGTERM/SIGINT.
const { FirestoreServer } = require('@firestore-emulator/server');

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node start.js <port>');
  process.exit(2);
}
const server = new FirestoreServer();
server.start(port).then(() => console.log(`ready ${port}`));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
