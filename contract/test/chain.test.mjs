// End-to-end test of `npm run chain`: start the service as a child process, send a wallet
// transfer carrying add_worker_hash through sendBoc, and read it back through runGetMethod.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, statSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Address, beginCell, external, internal, storeMessage, toNano, SendMode } from '@ton/core';
import { mnemonicToPrivateKey } from '@ton/crypto';
import { TonClient, WalletContractV4 } from '@ton/ton';
import { body } from '../lib/root.mjs';

const SERVER = join(dirname(fileURLToPath(import.meta.url)), '..', 'chain', 'server.mjs');
const HASH = 'ab'.repeat(32);
const MODEL = 'cd'.repeat(32);

let child;
let dir;
let state;
let ready;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'localchain-'));
  const stateFile = join(dir, 'state.json');
  child = spawn(process.execPath, [SERVER, '--port', '0', '--state-file', stateFile, '--json'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, CHAIN_MNEMONIC: '' },
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  ready = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`chain did not start in 45 s: ${stderr}`)), 45_000);
    child.stdout.on('data', (d) => {
      out += d;
      const nl = out.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(JSON.parse(out.slice(0, nl)));
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`chain exited with ${code}: ${stderr}`));
    });
  });
  state = JSON.parse(readFileSync(stateFile, 'utf8'));
});

after(() => {
  child?.kill('SIGTERM');
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function api(method, { get, post } = {}) {
  const url = new URL(`${state.rpc_url}/${method}`);
  if (get) for (const [k, v] of Object.entries(get)) url.searchParams.set(k, v);
  const res = await fetch(url, post ? { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(post) } : {});
  const json = await res.json();
  return { status: res.status, json };
}

async function teamWallet() {
  const keys = await mnemonicToPrivateKey(state.wallet.mnemonic.split(' '));
  const wallet = WalletContractV4.create({ workchain: 0, publicKey: keys.publicKey });
  return { keys, wallet };
}

test('ready line and state file describe the wallet and the root', async () => {
  assert.equal(ready.event, 'ready');
  assert.equal(ready.rpc_url, state.rpc_url);
  assert.match(state.rpc_url, /^http:\/\/127\.0\.0\.1:\d+\/api\/v2$/);
  // a base URL with a trailing slash joined with `/method` still works
  const doubled = await (await fetch(`${state.rpc_url}//getMasterchainInfo`)).json();
  assert.equal(doubled.ok, true);
  assert.equal(state.wallet.mnemonic.split(' ').length, 24);
  assert.equal(state.wallet.version, 'v4r2');
  assert.equal(statSync(join(dir, 'state.json')).mode & 0o777, 0o600);
  const { wallet } = await teamWallet();
  assert.ok(Address.parse(state.wallet.address).equals(wallet.address), 'mnemonic derives the wallet address');
  Address.parse(state.root.address);
  assert.match(state.root.code_hash, /^[0-9a-f]{64}$/);
});

test('getWalletInformation and getAddressInformation', async () => {
  const w = await api('getWalletInformation', { get: { address: state.wallet.address } });
  assert.equal(w.status, 200);
  assert.equal(w.json.ok, true);
  assert.equal(w.json.result.wallet, true);
  assert.equal(w.json.result.wallet_type, 'wallet v4 r2');
  assert.equal(w.json.result.account_state, 'active');
  assert.equal(w.json.result.seqno, 0);
  assert.equal(w.json.result.balance, toNano('1000').toString());
  const r = await api('getAddressInformation', { get: { address: state.root.address } });
  assert.equal(r.json.ok, true);
  assert.equal(r.json.result.state, 'active');
  assert.ok(BigInt(r.json.result.balance) > toNano('0.9'));
  assert.ok(r.json.result.code.length > 0 && r.json.result.data.length > 0);
  const nobody = await api('getAddressInformation', { get: { address: `0:${'00'.repeat(32)}` } });
  assert.equal(nobody.json.result.state, 'uninitialized');
  assert.equal(nobody.json.result.balance, '0');
  const rw = await api('getWalletInformation', { get: { address: state.root.address } });
  assert.equal(rw.json.result.wallet, false);
});

test('a wallet transfer with add_worker_hash sent via sendBoc is reported by runGetMethod', async () => {
  const root = Address.parse(state.root.address);
  const before = await api('runGetMethod', { post: { address: state.root.address, method: 'worker_hash_is_valid', stack: [['num', `0x${HASH}`]] } });
  assert.deepEqual(before.json.result.stack, [['num', '0x0']]);

  const { keys, wallet } = await teamWallet();
  const transfer = wallet.createTransfer({
    seqno: 0,
    secretKey: keys.secretKey,
    sendMode: SendMode.PAY_GAS_SEPARATELY | SendMode.IGNORE_ERRORS,
    messages: [internal({ to: root, value: toNano('0.05'), bounce: true, body: body.addWorkerHash(HASH, 77n) })],
  });
  const ext = external({ to: wallet.address, body: transfer });
  const boc = beginCell().store(storeMessage(ext)).endCell().toBoc().toString('base64');
  const sent = await api('sendBoc', { post: { boc } });
  assert.equal(sent.status, 200, JSON.stringify(sent.json));
  assert.deepEqual(sent.json, { ok: true, result: { '@type': 'ok' } });

  const afterGet = await api('runGetMethod', { post: { address: state.root.address, method: 'worker_hash_is_valid', stack: [['num', `0x${HASH}`]] } });
  assert.equal(afterGet.json.ok, true);
  assert.equal(afterGet.json.result.exit_code, 0);
  assert.deepEqual(afterGet.json.result.stack, [['num', '-0x1']]);
  // GET form with a JSON-encoded stack, decimal number
  const viaGet = await api('runGetMethod', { get: { address: state.root.address, method: 'worker_hash_is_valid', stack: JSON.stringify([['num', BigInt(`0x${HASH}`).toString()]]) } });
  assert.deepEqual(viaGet.json.result.stack, [['num', '-0x1']]);
  const ver = await api('runGetMethod', { post: { address: state.root.address, method: 'get_cocoon_data', stack: [] } });
  assert.equal(ver.json.result.stack[0][1], '0x1', 'version bumped once');

  const w = await api('getWalletInformation', { get: { address: state.wallet.address } });
  assert.equal(w.json.result.seqno, 1);

  // replaying the same external message is refused (seqno already used)
  const replay = await api('sendBoc', { post: { boc } });
  assert.equal(replay.status, 500);
  assert.equal(replay.json.ok, false);
  assert.equal(replay.json.code, 500);
  assert.match(replay.json.error, /external message/);
});

test('bad requests get toncenter-style errors', async () => {
  const notExternal = beginCell()
    .store(storeMessage({
      info: {
        type: 'internal', ihrDisabled: true, bounce: true, bounced: false,
        src: Address.parse(state.wallet.address), dest: Address.parse(state.root.address),
        value: { coins: 1n }, ihrFee: 0n, forwardFee: 0n, createdLt: 0n, createdAt: 0,
      },
      body: beginCell().endCell(),
    }))
    .endCell();
  const cases = [
    [await api('sendBoc', { post: {} }), 400],
    [await api('sendBoc', { post: { boc: 'not-a-boc' } }), 400],
    [await api('sendBoc', { post: { boc: notExternal.toBoc().toString('base64') } }), 400],
    [await api('sendBoc', { post: { boc: beginCell().storeUint(5, 8).endCell().toBoc().toString('base64') } }), 400],
    [await api('runGetMethod', { post: { address: 'xyz', method: 'seqno', stack: [] } }), 400],
    [await api('runGetMethod', { post: { address: state.root.address, method: 'worker_hash_is_valid', stack: [['num', 'zz']] } }), 400],
    [await api('getTransactionsX', { get: {} }), 404],
  ];
  for (const [r, status] of cases) {
    assert.equal(r.status, status, JSON.stringify(r.json));
    assert.equal(r.json.ok, false);
    assert.equal(r.json.code, status);
    assert.equal(typeof r.json.error, 'string');
  }
  const missing = await api('runGetMethod', { post: { address: state.root.address, method: 'no_such_method', stack: [] } });
  assert.equal(missing.json.ok, true);
  assert.equal(missing.json.result.exit_code, 11);
});

test("@ton/ton's TonClient works against the JSON-RPC endpoint", async () => {
  const client = new TonClient({ endpoint: `${state.rpc_url}/jsonRPC` });
  const root = Address.parse(state.root.address);
  const { keys, wallet } = await teamWallet();
  const opened = client.open(wallet);
  const seqno = await opened.getSeqno();
  assert.equal(seqno, 1);
  await opened.sendTransfer({
    seqno,
    secretKey: keys.secretKey,
    messages: [internal({ to: root, value: toNano('0.05'), body: body.addModelHash(MODEL) })],
  });
  const r = await client.runMethod(root, 'model_hash_is_valid', [{ type: 'int', value: BigInt(`0x${MODEL}`) }]);
  assert.equal(r.stack.readBigNumber(), -1n);
  const cd = await client.runMethod(root, 'get_cocoon_data');
  assert.equal(cd.stack.readNumber(), 2);
  cd.stack.skip(8);
  assert.ok(cd.stack.readAddress().equals(wallet.address), 'the team wallet owns the root');
  assert.ok((await client.getBalance(root)) > toNano('0.9'));
  assert.equal(await client.isContractDeployed(root), true);
});

test('getTransactions shows a rejected change (exit code 9, bounced) and the successful ones', async () => {
  const root = Address.parse(state.root.address);
  const { keys, wallet } = await teamWallet();
  const seqno = (await api('getWalletInformation', { get: { address: state.wallet.address } })).json.result.seqno;
  const malformed = beginCell().storeSlice(body.addWorkerHash(MODEL).beginParse()).storeUint(0, 8).endCell();
  const transfer = wallet.createTransfer({
    seqno,
    secretKey: keys.secretKey,
    sendMode: SendMode.PAY_GAS_SEPARATELY | SendMode.IGNORE_ERRORS,
    messages: [internal({ to: root, value: toNano('0.05'), bounce: true, body: malformed })],
  });
  const boc = beginCell().store(storeMessage(external({ to: wallet.address, body: transfer }))).endCell().toBoc().toString('base64');
  const sent = await api('sendBocReturnHash', { post: { boc } });
  assert.equal(sent.json.ok, true);
  assert.match(sent.json.result.hash, /^[A-Za-z0-9+/]{43}=$/);

  const txs = await api('getTransactions', { get: { address: state.root.address, limit: '10' } });
  assert.equal(txs.json.ok, true);
  const list = txs.json.result;
  assert.ok(list.length >= 4, 'deploy + two changes + the rejected one');
  assert.ok(BigInt(list[0].transaction_id.lt) > BigInt(list[1].transaction_id.lt), 'newest first');
  const rejected = list[0];
  assert.ok(Address.parse(rejected.address.account_address).equals(root));
  assert.ok(Address.parse(rejected.in_msg.source).equals(wallet.address));
  assert.equal(rejected.out_msgs.length, 1, 'only the bounce');
  assert.ok(Address.parse(rejected.out_msgs[0].destination).equals(wallet.address));
  const accepted = list[1];
  assert.deepEqual(accepted.out_msgs.map((m) => (m.destination === '' ? 'event' : 'excess')).sort(), ['event', 'excess']);

  const limited = await api('getTransactions', { get: { address: state.root.address, limit: '1' } });
  assert.equal(limited.json.result.length, 1);
  const older = await api('getTransactions', { get: { address: state.root.address, lt: accepted.transaction_id.lt, hash: accepted.transaction_id.hash } });
  assert.equal(older.json.result[0].transaction_id.lt, accepted.transaction_id.lt);

  // TonClient decodes the raw transactions: the rejection's exit code is visible
  const client = new TonClient({ endpoint: `${state.rpc_url}/jsonRPC` });
  const parsed = await client.getTransactions(root, { limit: 2 });
  assert.equal(parsed.length, 2);
  const [bad, good] = parsed.map((t) => t.description);
  assert.equal(bad.computePhase.type === 'vm' && bad.computePhase.exitCode, 9);
  assert.equal(bad.aborted, true);
  assert.equal(good.computePhase.type === 'vm' && good.computePhase.exitCode, 0);
  assert.equal((await api('runGetMethod', { post: { address: state.root.address, method: 'worker_hash_is_valid', stack: [['num', `0x${MODEL}`]] } })).json.result.stack[0][1], '0x0');
});
