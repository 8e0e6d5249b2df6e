#!/usr/bin/env node
// `npm run chain`: start the local chain (sandbox + root contract + funded team wallet) and serve
// the toncenter-v2 HTTP subset on 127.0.0.1. See contract/README.md.
import { readFileSync, writeFileSync, renameSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { toNano } from '@ton/core';
import { createLocalChain } from './localchain.mjs';

const HELP = `Usage: npm run chain -- [options]

Starts a local TON chain (an @ton/sandbox emulator, state in memory only) with the root contract
deployed and owned by a funded team wallet, and serves a toncenter-v2 HTTP subset on 127.0.0.1.

Options:
  --port N              TCP port on 127.0.0.1 (default 8081; 0 picks a free one)
  --state-file PATH     write {rpc_url, wallet{address, mnemonic, ...}, root{address, ...}} as JSON
                        to PATH (mode 0600) once the chain is ready; the Rust publisher reads it
  --mnemonic-file PATH  read the team wallet's 24 words from PATH (else env CHAIN_MNEMONIC,
                        else a fresh mnemonic is generated)
  --wallet v4r2|v5r1    team wallet contract (default v4r2)
  --upgrade-delay SEC   the root's upgrade time-lock in seconds (default 60 for local use)
  --wallet-balance TON  initial team wallet balance (default 1000)
  --worker-hash HEX     pre-approve a worker (image) hash; repeatable
  --model-hash HEX      pre-approve a model hash; repeatable
  --json                print only the machine-readable ready line (JSON) on stdout
  -h, --help            this text

Endpoints (all under http://127.0.0.1:PORT/api/v2/<method>): sendBoc, sendBocReturnHash, runGetMethod,
getAddressInformation, getAddressBalance, getWalletInformation, getMasterchainInfo, getTransactions,
jsonRPC.
Responses: {"ok": true, "result": ...} or {"ok": false, "error": "...", "code": HTTP status}.
Stop with Ctrl-C; nothing is persisted.`;

function fail(msg) {
  process.stderr.write(`error: ${msg}\n(run with --help for usage)\n`);
  process.exit(2);
}

let args;
try {
  args = parseArgs({
    options: {
      port: { type: 'string', default: '8081' },
      'state-file': { type: 'string' },
      'mnemonic-file': { type: 'string' },
      wallet: { type: 'string', default: 'v4r2' },
      'upgrade-delay': { type: 'string', default: '60' },
      'wallet-balance': { type: 'string', default: '1000' },
      'worker-hash': { type: 'string', multiple: true, default: [] },
      'model-hash': { type: 'string', multiple: true, default: [] },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }).values;
} catch (e) {
  fail(e.message);
}
if (args.help) {
  process.stdout.write(HELP + '\n');
  process.exit(0);
}

const port = Number(args.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`--port must be 0..65535, got ${args.port}`);
const upgradeDelay = Number(args['upgrade-delay']);
if (!Number.isInteger(upgradeDelay) || upgradeDelay < 0 || upgradeDelay >= 2 ** 32) fail('--upgrade-delay must be a whole number of seconds');

let mnemonic;
if (args['mnemonic-file']) {
  try {
    mnemonic = readFileSync(args['mnemonic-file'], 'utf8').trim().split(/\s+/);
  } catch (e) {
    fail(`cannot read --mnemonic-file: ${e.message}`);
  }
} else if (process.env.CHAIN_MNEMONIC) {
  mnemonic = process.env.CHAIN_MNEMONIC.trim().split(/\s+/);
}

let chain;
try {
  chain = await createLocalChain({
    mnemonic,
    walletVersion: args.wallet,
    walletBalance: toNano(args['wallet-balance']),
    upgradeDelay,
    workerHashes: args['worker-hash'],
    modelHashes: args['model-hash'],
  });
} catch (e) {
  fail(e.message);
}

let bound;
try {
  bound = await chain.listen(port);
} catch (e) {
  fail(`cannot listen on 127.0.0.1:${port}: ${e.message} (choose another --port, or 0 for a free one)`);
}

const rpcUrl = `http://127.0.0.1:${bound}/api/v2`; // clients append `/<method>`
const ready = { event: 'ready', rpc_url: rpcUrl, port: bound, ...chain.info };
if (args['state-file']) {
  const path = args['state-file'];
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, JSON.stringify({ rpc_url: rpcUrl, port: bound, ...chain.info }, null, 2) + '\n', { mode: 0o600 });
  renameSync(tmp, path);
  ready.state_file = path;
}
if (!args.json) {
  process.stderr.write(
    `local chain ready on ${rpcUrl}\n` +
      `  team wallet (${chain.info.wallet.version}): ${chain.info.wallet.address}\n` +
      `  root contract:           ${chain.info.root.address} (upgrade delay ${upgradeDelay}s)\n` +
      (args['state-file'] ? `  state written to ${args['state-file']}\n` : '') +
      `  (the ready line on stdout carries the wallet mnemonic: test chain only)\n`,
  );
}
process.stdout.write(JSON.stringify(ready) + '\n');

const stop = async () => {
  await chain.close();
  process.exit(0);
};
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
