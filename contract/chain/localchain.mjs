// A local TON chain for tests and demos: @ton/sandbox with the root contract and a funded team
// wallet, served over a toncenter-v2-compatible HTTP subset on loopback.
//
// The HTTP subset (see contract/README.md): sendBoc, sendBocReturnHash, runGetMethod,
// getAddressInformation, getWalletInformation, getAddressBalance, getMasterchainInfo,
// getTransactions, and the
// JSON-RPC form (POST /api/v2/jsonRPC) of the same methods that @ton/ton's TonClient uses.
import http from 'node:http';
import { Blockchain, createShardAccount } from '@ton/sandbox';
import { Address, beginCell, Cell, contractAddress, loadMessage, toNano } from '@ton/core';
import { mnemonicNew, mnemonicToPrivateKey, mnemonicValidate } from '@ton/crypto';
import { WalletContractV4, WalletContractV5R1 } from '@ton/ton';
import { compileRoot } from '../lib/compile.mjs';
import { rootInitData } from '../lib/root.mjs';

const WALLETS = {
  v4r2: { label: 'wallet v4 r2', make: (publicKey) => WalletContractV4.create({ workchain: 0, publicKey }) },
  v5r1: { label: 'wallet v5 r1', make: (publicKey) => WalletContractV5R1.create({ workchain: 0, publicKey }) },
};

/** An HTTP-level error that becomes `{"ok": false, "error": message, "code": status}`. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/**
 * Build the chain: sandbox, funded team wallet (from `mnemonic` words or a fresh one), and the
 * root contract owned by that wallet.
 */
export async function createLocalChain({
  mnemonic,
  walletVersion = 'v4r2',
  walletBalance = toNano('1000'),
  rootBalance = toNano('1'),
  upgradeDelay = 60,
  workerHashes = [],
  modelHashes = [],
  proxyHashes = [],
} = {}) {
  const kind = WALLETS[walletVersion];
  if (!kind) throw new Error(`unknown wallet version "${walletVersion}": use v4r2 or v5r1`);
  let words = mnemonic;
  let generated = false;
  if (!words) {
    words = await mnemonicNew(24);
    generated = true;
  }
  if (!(await mnemonicValidate(words))) {
    throw new Error('the wallet mnemonic is not a valid TON mnemonic: pass 24 words from a TON wallet, or none to generate one');
  }
  const keys = await mnemonicToPrivateKey(words);

  const blockchain = await Blockchain.create();
  const wallet = kind.make(keys.publicKey);
  await blockchain.setShardAccount(
    wallet.address,
    createShardAccount({ address: wallet.address, code: wallet.init.code, data: wallet.init.data, balance: walletBalance }),
  );

  const { code, codeHashHex } = await compileRoot();
  const data = rootInitData({ owner: wallet.address, upgradeDelay, workerHashes, modelHashes, proxyHashes });
  const init = { code, data };
  const rootAddress = contractAddress(0, init);
  const deployer = await blockchain.treasury('deployer');
  const res = await deployer.send({ to: rootAddress, value: rootBalance, init, body: beginCell().endCell() });
  const deployTx = res.transactions.find((t) => t.inMessage?.info.dest?.equals?.(rootAddress));
  if (!deployTx || deployTx.description.computePhase.type !== 'vm' || deployTx.description.computePhase.exitCode !== 0) {
    throw new Error('deploying the root contract into the sandbox failed');
  }

  const info = {
    network: 'local-sandbox',
    wallet: {
      version: walletVersion,
      address: wallet.address.toString({ bounceable: false, testOnly: true }),
      address_raw: wallet.address.toRawString(),
      public_key: keys.publicKey.toString('hex'),
      mnemonic: words.join(' '),
      mnemonic_generated: generated,
    },
    root: {
      address: rootAddress.toString({ bounceable: true, testOnly: true }),
      address_raw: rootAddress.toRawString(),
      code_hash: codeHashHex,
      upgrade_delay: upgradeDelay,
    },
  };
  const chain = new LocalChain(blockchain, info, wallet);
  chain.transactions.push(...res.transactions);
  return chain;
}

function parseAddress(s) {
  if (typeof s !== 'string' || s === '') throw new ApiError(400, 'missing "address" parameter');
  try {
    return Address.parse(s);
  } catch {
    throw new ApiError(400, `invalid address "${s}": expected raw (0:hex) or user-friendly form`);
  }
}

function b64cell(s, what) {
  try {
    const cells = Cell.fromBoc(Buffer.from(s, 'base64'));
    if (cells.length !== 1) throw new Error('not one root');
    return cells[0];
  } catch {
    throw new ApiError(400, `invalid ${what}: expected a base64 bag of cells with one root`);
  }
}

/** toncenter's input stack: [["num", "123" | "0x7b"], ["tvm.Cell", b64], ["tvm.Slice", b64], ...] */
function parseInputStack(stack) {
  let items = stack ?? [];
  if (typeof items === 'string') {
    try {
      items = JSON.parse(items);
    } catch {
      throw new ApiError(400, 'invalid "stack": expected a JSON array of [type, value] pairs');
    }
  }
  if (!Array.isArray(items)) throw new ApiError(400, 'invalid "stack": expected an array');
  return items.map((it) => {
    if (!Array.isArray(it) || it.length < 2) throw new ApiError(400, 'invalid stack entry: expected [type, value]');
    const [t, v] = it;
    switch (t) {
      case 'num':
      case 'int':
      case 'number': {
        const s = String(v).trim();
        try {
          return { type: 'int', value: s.startsWith('-') ? -BigInt(s.slice(1)) : BigInt(s) };
        } catch {
          throw new ApiError(400, `invalid number "${s}" in stack: use decimal or 0x-hex`);
        }
      }
      case 'cell':
      case 'tvm.Cell':
        return { type: 'cell', cell: b64cell(v?.bytes ?? v, 'cell in stack') };
      case 'slice':
      case 'tvm.Slice':
        return { type: 'slice', cell: b64cell(v?.bytes ?? v, 'slice in stack') };
      case 'builder':
      case 'tvm.Builder':
        return { type: 'builder', cell: b64cell(v?.bytes ?? v, 'builder in stack') };
      case 'null':
        return { type: 'null' };
      default:
        throw new ApiError(400, `unsupported stack entry type "${t}": use num, tvm.Cell, tvm.Slice`);
    }
  });
}

function hexNum(v) {
  return v < 0n ? `-0x${(-v).toString(16)}` : `0x${v.toString(16)}`;
}

function entryOf(item) {
  switch (item.type) {
    case 'int':
      return { '@type': 'tvm.stackEntryNumber', number: { '@type': 'tvm.numberDecimal', number: item.value.toString() } };
    case 'cell':
      return { '@type': 'tvm.stackEntryCell', cell: { '@type': 'tvm.cell', bytes: item.cell.toBoc().toString('base64') } };
    case 'slice':
      return { '@type': 'tvm.stackEntrySlice', slice: { '@type': 'tvm.slice', bytes: item.cell.toBoc().toString('base64') } };
    case 'tuple':
      return { '@type': 'tvm.stackEntryTuple', tuple: { '@type': 'tvm.tuple', elements: item.items.map(entryOf) } };
    default:
      return { '@type': 'tvm.stackEntryUnsupported' };
  }
}

/** toncenter's output stack: [["num", "0x.."], ["cell"|"slice", {bytes}], ["tuple", {elements}], ["null"]] */
function formatStackItem(item) {
  switch (item.type) {
    case 'int':
      return ['num', hexNum(item.value)];
    case 'nan':
      return ['num', 'NaN'];
    case 'null':
      return ['null'];
    case 'cell':
      return ['cell', { bytes: item.cell.toBoc().toString('base64') }];
    case 'slice':
      return ['slice', { bytes: item.cell.toBoc().toString('base64') }];
    case 'builder':
      return ['builder', { bytes: item.cell.toBoc().toString('base64') }];
    case 'tuple':
      return ['tuple', { '@type': 'tvm.tuple', elements: item.items.map(entryOf) }];
    default:
      return ['unsupported'];
  }
}

export class LocalChain {
  constructor(blockchain, info, wallet) {
    this.blockchain = blockchain;
    this.info = info;
    this.wallet = wallet;
    this.blockSeqno = 1;
    this.queue = Promise.resolve();
    /** Every transaction executed after start, oldest first (for tests and demos). */
    this.transactions = [];
  }

  /** Run `fn` after every earlier request: the sandbox is not re-entrant. */
  serialize(fn) {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => {});
    return run;
  }

  blockId() {
    return {
      '@type': 'ton.blockIdExt',
      workchain: -1,
      shard: '-9223372036854775808',
      seqno: this.blockSeqno,
      root_hash: Buffer.alloc(32).toString('base64'),
      file_hash: Buffer.alloc(32).toString('base64'),
    };
  }

  async account(addr) {
    const c = await this.blockchain.getContract(addr);
    const st = c.accountState;
    const state = !st ? 'uninitialized' : st.type === 'active' ? 'active' : st.type === 'frozen' ? 'frozen' : 'uninitialized';
    const lt = c.lastTransactionLt;
    const hash = c.lastTransactionHash;
    return {
      c,
      state,
      balance: c.balance,
      code: st?.type === 'active' && st.state.code ? st.state.code : null,
      data: st?.type === 'active' && st.state.data ? st.state.data : null,
      lastTx: {
        '@type': 'internal.transactionId',
        lt: lt.toString(),
        hash: Buffer.from(hash.toString(16).padStart(64, '0'), 'hex').toString('base64'),
      },
    };
  }

  async sendBoc(params) {
    if (!params || typeof params.boc !== 'string') throw new ApiError(400, 'missing "boc" (base64 bag of cells)');
    const cell = b64cell(params.boc, 'boc');
    let msg;
    try {
      msg = loadMessage(cell.beginParse());
    } catch {
      throw new ApiError(400, 'the boc is not a serialized message (expected an external-in message)');
    }
    if (msg.info.type !== 'external-in') {
      throw new ApiError(400, `only external-in messages are accepted, got ${msg.info.type}`);
    }
    return this.serialize(async () => {
      let res;
      try {
        res = await this.blockchain.sendMessage(msg);
      } catch (e) {
        throw new ApiError(500, `LITE_SERVER_UNKNOWN: cannot apply external message to current state: ${e.message ?? e}`);
      }
      this.blockSeqno += 1;
      this.transactions.push(...res.transactions);
      return { cell, transactions: res.transactions };
    });
  }

  async runGetMethod(params) {
    const addr = parseAddress(params?.address);
    const method = params?.method;
    if (typeof method !== 'string' && typeof method !== 'number') throw new ApiError(400, 'missing "method"');
    const stack = parseInputStack(params?.stack);
    return this.serialize(async () => {
      const acc = await this.account(addr);
      if (acc.state !== 'active') {
        return { '@type': 'smc.runResult', gas_used: 0, stack: [], exit_code: -13, block_id: this.blockId(), last_transaction_id: acc.lastTx };
      }
      const methodId = /^\d+$/.test(String(method)) ? Number(method) : String(method);
      let r;
      try {
        r = await acc.c.get(methodId, stack);
      } catch (e) {
        if (typeof e?.exitCode === 'number') {
          return { '@type': 'smc.runResult', gas_used: Number(e.gasUsed ?? 0), stack: [], exit_code: e.exitCode, block_id: this.blockId(), last_transaction_id: acc.lastTx };
        }
        throw new ApiError(500, `get-method failed: ${e.message ?? e}`);
      }
      return {
        '@type': 'smc.runResult',
        gas_used: Number(r.gasUsed),
        stack: r.stack.map(formatStackItem),
        exit_code: r.exitCode,
        block_id: this.blockId(),
        last_transaction_id: acc.lastTx,
      };
    });
  }

  async getAddressInformation(params) {
    const addr = parseAddress(params?.address);
    return this.serialize(async () => {
      const acc = await this.account(addr);
      return {
        '@type': 'raw.fullAccountState',
        balance: acc.balance.toString(),
        extra_currencies: [],
        code: acc.code ? acc.code.toBoc().toString('base64') : '',
        data: acc.data ? acc.data.toBoc().toString('base64') : '',
        last_transaction_id: acc.lastTx,
        block_id: this.blockId(),
        frozen_hash: '',
        sync_utime: this.now(),
        state: acc.state,
      };
    });
  }

  async getAddressBalance(params) {
    const r = await this.getAddressInformation(params);
    return r.balance;
  }

  async getWalletInformation(params) {
    const addr = parseAddress(params?.address);
    return this.serialize(async () => {
      const acc = await this.account(addr);
      const base = { balance: acc.balance.toString(), account_state: acc.state, last_transaction_id: acc.lastTx };
      if (acc.state !== 'active' || !acc.code) return { wallet: false, ...base };
      const codeHash = acc.code.hash();
      const known = Object.entries(WALLETS).find(([, k]) => k.make(Buffer.alloc(32)).init.code.hash().equals(codeHash));
      if (!known) return { wallet: false, ...base };
      const seqno = await acc.c.get('seqno', []);
      const out = { wallet: true, ...base, wallet_type: known[1].label, seqno: Number(seqno.stackReader.readBigNumber()) };
      if (known[0] === 'v4r2') {
        const s = acc.data.beginParse();
        s.loadUint(32);
        out.wallet_id = s.loadUint(32);
      }
      return out;
    });
  }

  now() {
    return this.blockchain.now ?? Math.floor(Date.now() / 1000);
  }

  /**
   * toncenter's getTransactions for one account, newest first: `address`, `limit` (default 10,
   * at most 100), optional `lt` + `hash` (start at that transaction) and `to_lt` (stop above it).
   */
  async getTransactions(params) {
    const addr = parseAddress(params?.address);
    const limit = params?.limit === undefined ? 10 : Number(params.limit);
    if (!Number.isInteger(limit) || limit < 1 || limit > 100) throw new ApiError(400, '"limit" must be 1..100');
    const bigOr = (v, dflt) => {
      if (v === undefined) return dflt;
      try {
        return BigInt(v);
      } catch {
        throw new ApiError(400, '"lt" and "to_lt" must be integers');
      }
    };
    const fromLt = bigOr(params?.lt, undefined);
    const toLt = bigOr(params?.to_lt, 0n);
    return this.serialize(async () => {
      const mine = this.transactions
        .filter((t) => t.inMessage && txAccount(t).equals(addr))
        .sort((a, b) => (a.lt < b.lt ? 1 : a.lt > b.lt ? -1 : 0))
        .filter((t) => (fromLt === undefined || t.lt <= fromLt) && t.lt > toLt);
      return mine.slice(0, limit).map((t) => formatTransaction(t, addr));
    });
  }

  async getMasterchainInfo() {
    const last = this.blockId();
    return { '@type': 'blocks.masterchainInfo', last, init: { ...last, seqno: 0 }, state_root_hash: last.root_hash };
  }

  /** Dispatch one API method (by toncenter name) with its parameters. */
  async call(method, params) {
    switch (method) {
      case 'sendBoc':
        await this.sendBoc(params);
        return { '@type': 'ok' };
      case 'sendBocReturnHash': {
        const { cell } = await this.sendBoc(params);
        const hash = cell.hash().toString('base64');
        return { '@type': 'raw.extMessageInfo', hash, hash_norm: hash };
      }
      case 'runGetMethod':
        return this.runGetMethod(params);
      case 'getAddressInformation':
        return this.getAddressInformation(params);
      case 'getAddressBalance':
        return this.getAddressBalance(params);
      case 'getWalletInformation':
        return this.getWalletInformation(params);
      case 'getMasterchainInfo':
        return this.getMasterchainInfo();
      case 'getTransactions':
        return this.getTransactions(params);
      default:
        throw new ApiError(404, `method "${method}" is not served by the local chain (served: sendBoc, sendBocReturnHash, runGetMethod, getAddressInformation, getAddressBalance, getWalletInformation, getMasterchainInfo, getTransactions, jsonRPC)`);
    }
  }

  /** Start the HTTP server on 127.0.0.1:`port` (0 picks a free port). Resolves to the bound port. */
  listen(port = 8081) {
    const server = http.createServer((req, res) => this.handle(req, res));
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, '127.0.0.1', () => resolve(server.address().port));
    });
  }

  close() {
    return new Promise((resolve) => {
      if (!this.server) return resolve();
      this.server.close(() => resolve());
      this.server.closeAllConnections(); // do not wait for idle keep-alive clients
    });
  }

  async handle(req, res) {
    const send = (status, obj) => {
      const text = JSON.stringify(obj);
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
      res.end(text);
    };
    let rpcId;
    try {
      const url = new URL(req.url, 'http://127.0.0.1');
      // tolerate `base/` + `/method` joins: collapse repeated slashes
      const m = url.pathname.replace(/\/{2,}/g, '/').match(/^\/api\/v2\/([A-Za-z]+)\/?$/);
      if (!m) throw new ApiError(404, `no such endpoint ${url.pathname}: use /api/v2/<method>`);
      if (req.method !== 'GET' && req.method !== 'POST') throw new ApiError(405, 'use GET or POST');
      let params = Object.fromEntries(url.searchParams.entries());
      if (req.method === 'POST') {
        const raw = await readBody(req);
        if (raw.length > 0) {
          let parsed;
          try {
            parsed = JSON.parse(raw);
          } catch {
            throw new ApiError(400, 'the request body is not valid JSON');
          }
          params = { ...params, ...parsed };
        }
      }
      let method = m[1];
      if (method === 'jsonRPC') {
        rpcId = params.id;
        if (typeof params.method !== 'string') throw new ApiError(400, 'JSON-RPC request without "method"');
        method = params.method;
        params = params.params ?? {};
      }
      const result = await this.call(method, params);
      send(200, rpcId !== undefined ? { ok: true, result, id: rpcId, jsonrpc: '2.0' } : { ok: true, result });
    } catch (e) {
      const status = e instanceof ApiError ? e.status : 500;
      const body = { ok: false, error: e.message ?? String(e), code: status };
      if (rpcId !== undefined) Object.assign(body, { id: rpcId, jsonrpc: '2.0' });
      send(status, body);
    }
  }
}

function txAccount(t) {
  // the account a transaction ran on: the destination of its inbound message
  return t.inMessage.info.dest;
}

function friendly(a) {
  if (!a) return '';
  if (a instanceof Address) return a.toString({ bounceable: true, testOnly: true });
  return ''; // external addresses are shown as empty, as toncenter does for addr_none
}

function formatMessage(m) {
  const info = m.info;
  const bodyCell = m.body ?? beginCell().endCell();
  return {
    '@type': 'raw.message',
    source: info.type === 'external-in' ? '' : friendly(info.src),
    destination: info.type === 'external-out' ? '' : friendly(info.dest),
    value: info.type === 'internal' ? info.value.coins.toString() : '0',
    fwd_fee: info.type === 'internal' ? info.forwardFee.toString() : '0',
    ihr_fee: info.type === 'internal' ? info.ihrFee.toString() : '0',
    created_lt: info.type === 'external-in' ? '0' : info.createdLt.toString(),
    body_hash: bodyCell.hash().toString('base64'),
    msg_data: { '@type': 'msg.dataRaw', body: bodyCell.toBoc().toString('base64'), init_state: '' },
    message: '',
  };
}

function formatTransaction(t, addr) {
  const d = t.description;
  const storageFee = d.storagePhase?.storageFeesCollected ?? 0n;
  return {
    '@type': 'raw.transaction',
    address: { '@type': 'accountAddress', account_address: friendly(addr) },
    utime: t.now,
    data: t.raw.toBoc().toString('base64'),
    transaction_id: { '@type': 'internal.transactionId', lt: t.lt.toString(), hash: t.hash().toString('base64') },
    fee: t.totalFees.coins.toString(),
    storage_fee: storageFee.toString(),
    other_fee: (t.totalFees.coins - storageFee).toString(),
    in_msg: t.inMessage ? formatMessage(t.inMessage) : undefined,
    out_msgs: [...t.outMessages.values()].map(formatMessage),
  };
}

function readBody(req, limit = 1 << 20) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(new ApiError(413, 'request body larger than 1 MiB'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}
