// Sandbox tests of the root contract: Cocoon compatibility, owner-only changes, events,
// excess return, bounces, trailing data, and the upgrade time-lock.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { beginCell, Dictionary, toNano } from '@ton/core';
import { compileTolk } from '../lib/compile.mjs';
import { OP, ERR, body, decodeEvents, DEFAULT_PARAMS } from '../lib/root.mjs';
import {
  setup, findTx, exitCode, actionResult, isAborted, internalOut, excessOf,
  getInt, getStack, rootData, version, NOW,
} from './helpers.mjs';

const H1 = 0x1111111111111111111111111111111111111111111111111111111111111111n;
const H2 = 0xfedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210n;

const HASH_KINDS = [
  { kind: 'worker', getter: 'worker_hash_is_valid', add: body.addWorkerHash, del: body.delWorkerHash, addOp: OP.ADD_WORKER_HASH, delOp: OP.DEL_WORKER_HASH },
  { kind: 'model', getter: 'model_hash_is_valid', add: body.addModelHash, del: body.delModelHash, addOp: OP.ADD_MODEL_HASH, delOp: OP.DEL_MODEL_HASH },
  { kind: 'proxy', getter: 'proxy_hash_is_valid', add: body.addProxyHash, del: body.delProxyHash, addOp: OP.ADD_PROXY_HASH, delOp: OP.DEL_PROXY_HASH },
];

/** Parse the storage exactly as a Cocoon reader does (FunC order) and return the hash sets. */
function parseCocoonStorage(data) {
  const s = data.beginParse();
  const owner = s.loadAddress();
  const ver = s.loadUint(32);
  const d = s.loadRef().beginParse();
  const params = s.loadRef().beginParse();
  const keys = (dict) => dict.keys().sort();
  const empty = { serialize: () => {}, parse: () => null };
  const proxyHashes = keys(d.loadDict(Dictionary.Keys.BigUint(256), empty));
  const registered = d.loadDict(Dictionary.Keys.Uint(32), { serialize: () => {}, parse: (v) => v });
  const lastProxySeqno = d.loadUint(32);
  const workerHashes = keys(d.loadDict(Dictionary.Keys.BigUint(256), empty));
  const modelHashes = keys(d.loadDict(Dictionary.Keys.BigUint(256), empty));
  d.endParse();
  const structVersion = params.loadUint(8);
  const paramsVersion = params.loadUint(32);
  return { owner, version: ver, proxyHashes, registered, lastProxySeqno, workerHashes, modelHashes, structVersion, paramsVersion, extraRefs: s.remainingRefs };
}

describe('deployment and get-methods', () => {
  test('fresh root answers Cocoon get-methods with empty lists', async () => {
    const { blockchain, root, owner } = await setup();
    for (const k of HASH_KINDS) assert.equal(await getInt(blockchain, root, k.getter, [H1]), 0n);
    assert.equal(await getInt(blockchain, root, 'last_proxy_seqno'), 0n);
    const cd = await getStack(blockchain, root, 'get_cocoon_data');
    assert.equal(cd.length, 10);
    assert.deepEqual(cd.slice(0, 9).map((e) => e.value), [0n, 0n, 1n, 1n, 1n, 20n, 18n, toNano('10'), toNano('1')]);
    assert.equal(cd[9].type, 'slice');
    assert.ok(cd[9].cell.beginParse().loadAddress().equals(owner.address));
    const cp = await getStack(blockchain, root, 'get_cur_params');
    assert.equal(cp.length, 14);
    assert.deepEqual(cp.map((e) => e.value), [
      1n, 1n, 1n, 20n, 18n, 1000n, 40000n, 86400n, 86400n, toNano('10'), toNano('1'), 0n, 0n, 0n,
    ]);
    const up = await getStack(blockchain, root, 'get_upgrade_state');
    assert.deepEqual(up.map((e) => e.value), [3600n, 0n, 0n]);
  });

  test('initial hashes in storage are reported valid', async () => {
    const { blockchain, root } = await setup({ workerHashes: [H1], modelHashes: [H2], proxyHashes: [H1, H2] });
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), -1n);
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H2]), 0n);
    assert.equal(await getInt(blockchain, root, 'model_hash_is_valid', [H2]), -1n);
    assert.equal(await getInt(blockchain, root, 'proxy_hash_is_valid', [H1]), -1n);
    assert.equal(await getInt(blockchain, root, 'proxy_hash_is_valid', [H2]), -1n);
  });

  test('storage parses with the Cocoon (FunC-order) layout', async () => {
    const { blockchain, root, owner } = await setup();
    await owner.send({ to: root, value: toNano('0.02'), body: body.addWorkerHash(H1) });
    await owner.send({ to: root, value: toNano('0.02'), body: body.addModelHash(H2) });
    await owner.send({ to: root, value: toNano('0.02'), body: body.addProxyHash(H1) });
    await owner.send({ to: root, value: toNano('0.02'), body: body.registerProxy('10.0.0.1:8888') });
    const st = parseCocoonStorage(await rootData(blockchain, root));
    assert.ok(st.owner.equals(owner.address));
    assert.equal(st.version, 4);
    assert.deepEqual(st.workerHashes, [H1]);
    assert.deepEqual(st.modelHashes, [H2]);
    assert.deepEqual(st.proxyHashes, [H1]);
    assert.equal(st.lastProxySeqno, 1);
    assert.equal(st.registered.size, 1);
    assert.equal(st.structVersion, DEFAULT_PARAMS.structVersion);
    assert.equal(st.extraRefs, 1, 'one extra ref (governance) after ^data ^params');
  });
});

describe('hash lists (owner only)', () => {
  for (const k of HASH_KINDS) {
    test(`add and delete ${k.kind} hash: state, version, event, excess`, async () => {
      const { blockchain, root, owner } = await setup();
      let r = await owner.send({ to: root, value: toNano('0.05'), body: k.add(H1, 42n) });
      let tx = findTx(r, root);
      assert.equal(exitCode(tx), 0);
      assert.equal(actionResult(tx), 0);
      assert.equal(await getInt(blockchain, root, k.getter, [H1]), -1n);
      assert.equal(await getInt(blockchain, root, k.getter, [H2]), 0n);
      assert.equal(await version(blockchain, root), 1n);
      assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.hash, e.dest]), [[k.addOp, H1, null]]);
      const ex = excessOf(tx);
      assert.ok(ex, 'excess returned');
      assert.equal(ex.queryId, 42n);
      assert.equal(ex.bounce, false);
      assert.ok(ex.dest.equals(owner.address));

      // other lists are untouched
      for (const other of HASH_KINDS.filter((o) => o !== k)) {
        assert.equal(await getInt(blockchain, root, other.getter, [H1]), 0n);
      }

      r = await owner.send({ to: root, value: toNano('0.05'), body: k.del(H1, 43n) });
      tx = findTx(r, root);
      assert.equal(exitCode(tx), 0);
      assert.equal(await getInt(blockchain, root, k.getter, [H1]), 0n);
      assert.equal(await version(blockchain, root), 2n);
      assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.hash]), [[k.delOp, H1]]);
      assert.equal(excessOf(tx).queryId, 43n);
    });
  }

  test('non-owner is rejected with 1010, bounced, and nothing changes', async () => {
    const { blockchain, root, stranger } = await setup();
    const before = (await rootData(blockchain, root)).hash();
    for (const b of [body.addWorkerHash(H1), body.addModelHash(H1), body.delProxyHash(H1), body.changeOwner(stranger.address), body.proposeUpgrade(H1), body.setCode(beginCell().endCell())]) {
      const r = await stranger.send({ to: root, value: toNano('0.05'), body: b });
      const tx = findTx(r, root);
      assert.equal(exitCode(tx), ERR.NOT_OWNER);
      assert.ok(isAborted(tx));
      const bounces = internalOut(tx);
      assert.equal(bounces.length, 1, 'a bounce goes back');
      assert.ok(bounces[0].info.dest.equals(stranger.address));
      assert.equal(bounces[0].info.bounced, true);
      assert.equal(decodeEvents(tx.outMessages.values()).length, 0, 'no event');
    }
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), 0n);
    assert.equal((await rootData(blockchain, root)).hash().toString('hex'), before.toString('hex'));
  });

  test('adding an existing hash is idempotent but still a change (version, event)', async () => {
    const { blockchain, root, owner } = await setup({ workerHashes: [H1] });
    const r = await owner.send({ to: root, value: toNano('0.05'), body: body.addWorkerHash(H1) });
    assert.equal(exitCode(findTx(r, root)), 0);
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), -1n);
    assert.equal(await version(blockchain, root), 1n);
  });
});

describe('message handling', () => {
  test('empty body and top-up op 0x9a1247c0 are accepted silently', async () => {
    const { blockchain, root, stranger } = await setup();
    const before = (await blockchain.getContract(root)).balance;
    for (const b of [beginCell().endCell(), body.topUp()]) {
      const r = await stranger.send({ to: root, value: toNano('1'), body: b });
      const tx = findTx(r, root);
      assert.equal(exitCode(tx), 0);
      assert.equal(tx.outMessages.size, 0, 'no excess, no event');
    }
    assert.ok((await blockchain.getContract(root)).balance > before + toNano('1.9'));
    assert.equal(await version(blockchain, root), 0n);
  });

  test('bounced messages are ignored', async () => {
    const { blockchain, root, owner } = await setup();
    const r = await blockchain.sendMessage({
      info: {
        type: 'internal', ihrDisabled: true, bounce: false, bounced: true,
        src: owner.address, dest: root, value: { coins: toNano('0.05') },
        ihrFee: 0n, forwardFee: 0n, createdLt: 0n, createdAt: NOW,
      },
      body: beginCell().storeUint(0xffffffff, 32).storeUint(OP.ADD_WORKER_HASH, 32).storeUint(0, 64).storeUint(H1 >> 128n, 128).endCell(),
    });
    const tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.equal(tx.outMessages.size, 0);
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), 0n);
    assert.equal(await version(blockchain, root), 0n);
  });

  test('trailing bits or refs are rejected with exit code 9 (as the FunC contract)', async () => {
    const { blockchain, root, owner } = await setup();
    const withBits = beginCell().storeSlice(body.addWorkerHash(H1).beginParse()).storeUint(1, 8).endCell();
    const withRef = beginCell().storeSlice(body.addWorkerHash(H1).beginParse()).storeRef(beginCell().endCell()).endCell();
    const short = beginCell().storeUint(OP.ADD_WORKER_HASH, 32).storeUint(0, 64).storeUint(1, 200).endCell();
    for (const b of [withBits, withRef, short]) {
      const r = await owner.send({ to: root, value: toNano('0.05'), body: b });
      const tx = findTx(r, root);
      assert.equal(exitCode(tx), ERR.CELL_UNDERFLOW);
      assert.equal(internalOut(tx)[0].info.bounced, true);
    }
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), 0n);
    assert.equal(await version(blockchain, root), 0n);
  });

  test('unknown op from the owner fails with 0xffff', async () => {
    const { root, owner } = await setup();
    const r = await owner.send({ to: root, value: toNano('0.05'), body: beginCell().storeUint(0x12345678, 32).storeUint(0, 64).endCell() });
    assert.equal(exitCode(findTx(r, root)), ERR.UNKNOWN_OP);
  });

  test('excess: the root keeps its old balance plus storage fee, the sender gets the rest', async () => {
    const { blockchain, root, owner } = await setup();
    blockchain.now = NOW + 86400 * 30; // let storage fees accrue
    const before = (await blockchain.getContract(root)).balance;
    const r = await owner.send({ to: root, value: toNano('1'), body: body.addWorkerHash(H1, 7n) });
    const tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    const after = (await blockchain.getContract(root)).balance;
    assert.equal(after, before, 'balance restored exactly (storage fee paid by the sender)');
    const ex = excessOf(tx);
    assert.ok(ex.value > toNano('0.99') && ex.value < toNano('1'), `excess ${ex.value}`);
  });

  test('excess: a root below 0.01 TON is topped up to 0.01 TON from the message value', async () => {
    const { blockchain, root, owner } = await setup({ deployValue: toNano('0.002') });
    const r = await owner.send({ to: root, value: toNano('0.5'), body: body.addWorkerHash(H1) });
    assert.equal(exitCode(findTx(r, root)), 0);
    assert.equal((await blockchain.getContract(root)).balance, toNano('0.01'));
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), -1n);
  });

  test('excess: if 0.01 TON cannot be kept the action phase fails (37) and nothing is stored', async () => {
    const { blockchain, root, owner } = await setup({ deployValue: toNano('0.002') });
    const r = await owner.send({ to: root, value: toNano('0.006'), body: body.addWorkerHash(H1) });
    const tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.equal(actionResult(tx), 37);
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), 0n);
  });
});

describe('proxies, params, owner', () => {
  test('register, update, unregister proxy: seqno, events, unknown seqno', async () => {
    const { blockchain, root, owner } = await setup();
    let r = await owner.send({ to: root, value: toNano('0.05'), body: body.registerProxy('proxy-a:443') });
    assert.deepEqual(decodeEvents(findTx(r, root).outMessages.values()).map((e) => [e.op, e.seqno]), [[OP.REGISTER_PROXY, 1]]);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.registerProxy('proxy-b:443') });
    assert.equal(await getInt(blockchain, root, 'last_proxy_seqno'), 2n);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.updateProxy(1, 'proxy-a2:443') });
    assert.equal(exitCode(findTx(r, root)), 0);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.unregisterProxy(2) });
    assert.deepEqual(decodeEvents(findTx(r, root).outMessages.values()).map((e) => [e.op, e.seqno]), [[OP.UNREGISTER_PROXY, 2]]);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.unregisterProxy(2) });
    assert.equal(exitCode(findTx(r, root)), ERR.UNKNOWN_PROXY);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.updateProxy(9, 'x') });
    assert.equal(exitCode(findTx(r, root)), ERR.UNKNOWN_PROXY);
    const st = parseCocoonStorage(await rootData(blockchain, root));
    assert.deepEqual(st.registered.keys(), [1]);
    const desc = st.registered.get(1);
    assert.equal(desc.loadUint(1), 0);
    const len = desc.loadUint(7);
    assert.equal(desc.loadBuffer(len).toString(), 'proxy-a2:443');
    assert.equal(await getInt(blockchain, root, 'last_proxy_seqno'), 2n);
  });

  test('malformed proxy description is rejected', async () => {
    const { root, owner } = await setup();
    const bad = beginCell().storeUint(OP.REGISTER_PROXY, 32).storeUint(0, 64).storeUint(0, 1).storeUint(5, 7).storeBuffer(Buffer.from('ab')).endCell();
    const r = await owner.send({ to: root, value: toNano('0.05'), body: bad });
    assert.equal(exitCode(findTx(r, root)), ERR.CELL_UNDERFLOW);
  });

  test('change_fees bumps params_version and shows in get_cocoon_data', async () => {
    const { blockchain, root, owner } = await setup();
    const r = await owner.send({ to: root, value: toNano('0.05'), body: body.changeFees(100n, 90n) });
    assert.deepEqual(decodeEvents(findTx(r, root).outMessages.values()).map((e) => [e.op, e.paramsVersion]), [[OP.CHANGE_FEES, 2]]);
    const cd = (await getStack(blockchain, root, 'get_cocoon_data')).map((e) => e.value);
    assert.deepEqual(cd.slice(0, 7), [1n, 0n, 2n, 1n, 1n, 100n, 90n]);
  });

  test('change_params and update_contract_codes show in get_cur_params', async () => {
    const { blockchain, root, owner } = await setup();
    const params = beginCell().storeUint(OP.CHANGE_PARAMS, 32).storeUint(9, 64)
      .storeCoins(30n).storeCoins(25n).storeUint(600, 32).storeUint(700, 32)
      .storeCoins(toNano('20')).storeCoins(toNano('2')).endCell();
    let r = await owner.send({ to: root, value: toNano('0.05'), body: params });
    let tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.equal(excessOf(tx).queryId, 9n);
    assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.paramsVersion]), [[OP.CHANGE_PARAMS, 2]]);
    const codes = [1, 2, 3].map((i) => beginCell().storeUint(i, 8).endCell());
    r = await owner.send({
      to: root, value: toNano('0.05'),
      body: beginCell().storeUint(OP.UPDATE_CONTRACT_CODES, 32).storeUint(0, 64).storeRef(codes[0]).storeRef(codes[1]).storeRef(codes[2]).endCell(),
    });
    tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.paramsVersion]), [[OP.UPDATE_CONTRACT_CODES, 3]]);
    const cp = (await getStack(blockchain, root, 'get_cur_params')).map((e) => e.value);
    const h = (c) => BigInt('0x' + c.hash().toString('hex'));
    assert.deepEqual(cp, [3n, 1n, 1n, 30n, 25n, 1000n, 40000n, 600n, 700n, toNano('20'), toNano('2'), h(codes[0]), h(codes[1]), h(codes[2])]);
    assert.equal(await version(blockchain, root), 2n);
  });

  test('change_owner: event, new owner rules, old owner gets 1010', async () => {
    const { blockchain, root, owner, stranger } = await setup();
    let r = await owner.send({ to: root, value: toNano('0.05'), body: body.changeOwner(stranger.address, 5n) });
    let tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    const ev = decodeEvents(tx.outMessages.values());
    assert.equal(ev.length, 1);
    assert.equal(ev[0].op, OP.CHANGE_OWNER);
    assert.ok(ev[0].newOwner.equals(stranger.address));
    assert.equal(excessOf(tx).queryId, 5n);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.addWorkerHash(H1) });
    assert.equal(exitCode(findTx(r, root)), ERR.NOT_OWNER);
    r = await stranger.send({ to: root, value: toNano('0.05'), body: body.addWorkerHash(H1) });
    assert.equal(exitCode(findTx(r, root)), 0);
    const cd = await getStack(blockchain, root, 'get_cocoon_data');
    assert.ok(cd[9].cell.beginParse().loadAddress().equals(stranger.address));
  });
});

describe('upgrade guard (time-lock)', () => {
  async function targetCode() {
    return (await compileTolk('test/contracts/upgrade_target.tolk')).code;
  }

  test('set_code without a proposal is refused (1020)', async () => {
    const { root, owner } = await setup();
    const r = await owner.send({ to: root, value: toNano('0.05'), body: body.setCode(await targetCode()) });
    assert.equal(exitCode(findTx(r, root)), ERR.NO_PENDING_UPGRADE);
  });

  test('propose, wait out the delay, execute: code replaced, storage kept, events', async () => {
    const { blockchain, root, owner } = await setup({ upgradeDelay: 3600, workerHashes: [H1] });
    await owner.send({ to: root, value: toNano('0.05'), body: body.addModelHash(H2) }); // version 1
    const code = await targetCode();
    const codeHash = BigInt('0x' + code.hash().toString('hex'));

    let r = await owner.send({ to: root, value: toNano('0.05'), body: body.proposeUpgrade(codeHash, 1n) });
    let tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.codeHash, e.notBefore]), [[OP.PROPOSE_UPGRADE, codeHash, NOW + 3600]]);
    assert.deepEqual((await getStack(blockchain, root, 'get_upgrade_state')).map((e) => e.value), [3600n, codeHash, BigInt(NOW + 3600)]);
    assert.equal(await version(blockchain, root), 1n, 'governance ops do not bump version');

    // wrong code
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.setCode(beginCell().storeUint(1, 8).endCell()) });
    assert.equal(exitCode(findTx(r, root)), ERR.CODE_HASH_MISMATCH);
    // too early
    blockchain.now = NOW + 3599;
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.setCode(code) });
    assert.equal(exitCode(findTx(r, root)), ERR.UPGRADE_TOO_EARLY);
    assert.equal(await getInt(blockchain, root, 'worker_hash_is_valid', [H1]), -1n, 'old code still runs');

    blockchain.now = NOW + 3600;
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.setCode(code, 2n) });
    tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.equal(actionResult(tx), 0);
    assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.hash]), [[OP.SET_CODE, codeHash]]);
    assert.equal(excessOf(tx).queryId, 2n);
    assert.equal(await getInt(blockchain, root, 'code_generation'), 2n);
    assert.equal(await getInt(blockchain, root, 'stored_version'), 1n, 'storage kept, set_code does not bump version');
  });

  test('a non-owner cannot execute even a matured proposal', async () => {
    const { blockchain, root, owner, stranger } = await setup({ upgradeDelay: 10 });
    const code = await targetCode();
    await owner.send({ to: root, value: toNano('0.05'), body: body.proposeUpgrade(BigInt('0x' + code.hash().toString('hex'))) });
    blockchain.now = NOW + 100;
    const r = await stranger.send({ to: root, value: toNano('0.05'), body: body.setCode(code) });
    assert.equal(exitCode(findTx(r, root)), ERR.NOT_OWNER);
  });

  test('re-proposing restarts the clock; cancel clears the proposal', async () => {
    const { blockchain, root, owner } = await setup({ upgradeDelay: 100 });
    const code = await targetCode();
    const codeHash = BigInt('0x' + code.hash().toString('hex'));
    await owner.send({ to: root, value: toNano('0.05'), body: body.proposeUpgrade(codeHash) });
    blockchain.now = NOW + 90;
    await owner.send({ to: root, value: toNano('0.05'), body: body.proposeUpgrade(codeHash) });
    blockchain.now = NOW + 150;
    let r = await owner.send({ to: root, value: toNano('0.05'), body: body.setCode(code) });
    assert.equal(exitCode(findTx(r, root)), ERR.UPGRADE_TOO_EARLY);

    r = await owner.send({ to: root, value: toNano('0.05'), body: body.cancelUpgrade(3n) });
    const tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.hash]), [[OP.CANCEL_UPGRADE, codeHash]]);
    assert.deepEqual((await getStack(blockchain, root, 'get_upgrade_state')).map((e) => e.value), [100n, 0n, 0n]);
    blockchain.now = NOW + 1000;
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.setCode(code) });
    assert.equal(exitCode(findTx(r, root)), ERR.NO_PENDING_UPGRADE);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.cancelUpgrade() });
    assert.equal(exitCode(findTx(r, root)), ERR.NO_PENDING_UPGRADE);
  });

  test('the delay can only be raised, up to one year', async () => {
    const { blockchain, root, owner } = await setup({ upgradeDelay: 100 });
    let r = await owner.send({ to: root, value: toNano('0.05'), body: body.raiseUpgradeDelay(50) });
    assert.equal(exitCode(findTx(r, root)), ERR.DELAY_NOT_RAISED);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.raiseUpgradeDelay(100) });
    assert.equal(exitCode(findTx(r, root)), ERR.DELAY_NOT_RAISED);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.raiseUpgradeDelay(365 * 86400 + 1) });
    assert.equal(exitCode(findTx(r, root)), ERR.DELAY_TOO_LONG);
    r = await owner.send({ to: root, value: toNano('0.05'), body: body.raiseUpgradeDelay(7200) });
    const tx = findTx(r, root);
    assert.equal(exitCode(tx), 0);
    assert.deepEqual(decodeEvents(tx.outMessages.values()).map((e) => [e.op, e.delay]), [[OP.RAISE_UPGRADE_DELAY, 7200]]);
    assert.equal((await getStack(blockchain, root, 'get_upgrade_state'))[0].value, 7200n);
  });

  test('Cocoon reset and full (code+data) upgrade are disabled (1024)', async () => {
    const { root, owner } = await setup();
    const code = await targetCode();
    for (const b of [
      beginCell().storeUint(OP.RESET, 32).storeUint(0, 64).endCell(),
      beginCell().storeUint(OP.UPGRADE_FULL, 32).storeUint(0, 64).storeRef(beginCell().endCell()).storeRef(code).endCell(),
    ]) {
      const r = await owner.send({ to: root, value: toNano('0.05'), body: b });
      assert.equal(exitCode(findTx(r, root)), ERR.DISABLED);
    }
  });
});

