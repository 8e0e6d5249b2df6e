// Shared test helpers: a deterministic sandbox with a deployed root contract.
import { Blockchain, Executor } from '@ton/sandbox';
import { beginCell, contractAddress, toNano } from '@ton/core';
import { compileRoot } from '../lib/compile.mjs';
import { rootInitData, OP } from '../lib/root.mjs';

export const NOW = 1_750_000_000;

// One emulator instance (WASM) for all sandboxes of a test file: each test still gets its own
// chain state, but does not pay for instantiating the emulator again.
let executor;
async function sharedExecutor() {
  executor ??= await Executor.create();
  return executor;
}

/** A fresh sandbox (fixed clock) with the root contract deployed by `owner`. */
export async function setup({ upgradeDelay = 3600, deployValue = toNano('0.05'), ...initOpts } = {}) {
  const blockchain = await Blockchain.create({ executor: await sharedExecutor() });
  blockchain.now = NOW;
  const owner = await blockchain.treasury('owner');
  const stranger = await blockchain.treasury('stranger');
  const { code } = await compileRoot();
  const data = rootInitData({ owner: owner.address, upgradeDelay, ...initOpts });
  const init = { code, data };
  const root = contractAddress(0, init);
  const r = await owner.send({ to: root, value: deployValue, init, body: beginCell().endCell() });
  const deployTx = findTx(r, root);
  if (!deployTx || exitCode(deployTx) !== 0) throw new Error('root deployment failed');
  return { blockchain, owner, stranger, root, code, init };
}

/** The transaction of `result` executed on account `addr` (the first one). */
export function findTx(result, addr) {
  return result.transactions.find(
    (t) => t.inMessage?.info.dest && typeof t.inMessage.info.dest.equals === 'function' && t.inMessage.info.dest.equals(addr),
  );
}

export function exitCode(tx) {
  const cp = tx.description.computePhase;
  return cp.type === 'vm' ? cp.exitCode : null;
}

export function actionResult(tx) {
  return tx.description.actionPhase?.resultCode ?? null;
}

export function isAborted(tx) {
  return tx.description.aborted;
}

/** Internal out-messages of a transaction. */
export function internalOut(tx) {
  return [...tx.outMessages.values()].filter((m) => m.info.type === 'internal');
}

/** The excess reply (op 0x2565934c) among a transaction's out-messages, or undefined. */
export function excessOf(tx) {
  for (const m of internalOut(tx)) {
    const s = m.body.beginParse();
    if (s.remainingBits >= 96 && s.preloadUint(32) === OP.EXCESSES) {
      s.loadUint(32);
      return { msg: m, queryId: s.loadUintBig(64), value: m.info.value.coins, bounce: m.info.bounce, dest: m.info.dest };
    }
  }
  return undefined;
}

export async function getInt(blockchain, addr, method, args = []) {
  const r = await blockchain.runGetMethod(
    addr,
    method,
    args.map((v) => ({ type: 'int', value: BigInt(v) })),
  );
  if (r.exitCode !== 0) throw new Error(`${method} exited with ${r.exitCode}`);
  return r.stackReader.readBigNumber();
}

export async function getStack(blockchain, addr, method, args = []) {
  const r = await blockchain.runGetMethod(
    addr,
    method,
    args.map((v) => ({ type: 'int', value: BigInt(v) })),
  );
  if (r.exitCode !== 0) throw new Error(`${method} exited with ${r.exitCode}`);
  return r.stack;
}

export async function rootData(blockchain, addr) {
  const c = await blockchain.getContract(addr);
  const st = c.accountState;
  if (st?.type !== 'active') throw new Error('root not active');
  return st.state.data;
}

export async function version(blockchain, addr) {
  const st = await getStack(blockchain, addr, 'get_cocoon_data');
  return st[0].value;
}
