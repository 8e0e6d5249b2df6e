// JS side of the root contract: storage (init data) builder, message bodies, event decoding.
// The layouts here are the ones documented in contract/README.md.
import { beginCell, Dictionary, toNano } from '@ton/core';

export const OP = Object.freeze({
  ADD_WORKER_HASH: 0xe34b1c60,
  DEL_WORKER_HASH: 0x8d94a79a,
  ADD_MODEL_HASH: 0xc146134d,
  DEL_MODEL_HASH: 0x92b11c18,
  ADD_PROXY_HASH: 0x71860e80,
  DEL_PROXY_HASH: 0x3c41d0b2,
  REGISTER_PROXY: 0x927c7cb5,
  UNREGISTER_PROXY: 0x6d49eaf2,
  UPDATE_PROXY: 0x9c7924ba,
  CHANGE_FEES: 0xc52ed8d4,
  CHANGE_PARAMS: 0x022fa189,
  UPDATE_CONTRACT_CODES: 0xa2370f61,
  CHANGE_OWNER: 0xc4a1ae54,
  SET_CODE: 0x11aefd51,
  RESET: 0x563c1d96,
  UPGRADE_FULL: 0x4f7c5789,
  TOP_UP: 0x9a1247c0,
  EXCESSES: 0x2565934c,
  PROPOSE_UPGRADE: 0x5e7a1c01,
  CANCEL_UPGRADE: 0x5e7a1c02,
  RAISE_UPGRADE_DELAY: 0x5e7a1c03,
});

export const ERR = Object.freeze({
  CELL_UNDERFLOW: 9,
  NOT_OWNER: 1010,
  NO_PENDING_UPGRADE: 1020,
  CODE_HASH_MISMATCH: 1021,
  UPGRADE_TOO_EARLY: 1022,
  DELAY_NOT_RAISED: 1023,
  DISABLED: 1024,
  DELAY_TOO_LONG: 1025,
  UNKNOWN_PROXY: 1030,
  BAD_PROXY_DESC: 1031,
  UNKNOWN_OP: 0xffff,
});

/** Default ("plausible") Cocoon params, struct_version 3. */
export const DEFAULT_PARAMS = Object.freeze({
  structVersion: 3,
  paramsVersion: 1,
  uniqueId: 1,
  isTest: true,
  pricePerToken: 20n,
  workerFeePerToken: 18n,
  promptTokensPriceMultiplier: 10000,
  cachedTokensPriceMultiplier: 1000,
  completionTokensPriceMultiplier: 40000,
  reasoningTokensPriceMultiplier: 40000,
  proxyDelayBeforeClose: 86400,
  clientDelayBeforeClose: 86400,
  minProxyStake: toNano('10'),
  minClientStake: toNano('1'),
  proxyScCode: null,
  workerScCode: null,
  clientScCode: null,
});

/** Default upgrade time-lock: 48 hours. */
export const DEFAULT_UPGRADE_DELAY = 48 * 3600;

function hashSet(hashes = []) {
  const d = Dictionary.empty(Dictionary.Keys.BigUint(256), {
    serialize: () => {},
    parse: () => null,
  });
  for (const h of hashes) d.set(toHashInt(h), null);
  return d;
}

/** Accepts a bigint, a 64-char hex string (optionally 0x-prefixed) or a 32-byte Buffer. */
export function toHashInt(h) {
  if (typeof h === 'bigint') return h;
  if (Buffer.isBuffer(h) || h instanceof Uint8Array) {
    if (h.length !== 32) throw new Error(`hash must be 32 bytes, got ${h.length}`);
    return BigInt('0x' + Buffer.from(h).toString('hex'));
  }
  if (typeof h === 'string') {
    const s = h.startsWith('0x') ? h.slice(2) : h;
    if (!/^[0-9a-fA-F]{64}$/.test(s)) throw new Error(`hash must be 64 hex digits, got ${h}`);
    return BigInt('0x' + s);
  }
  throw new Error(`unsupported hash value ${h}`);
}

export function paramsCell(p = DEFAULT_PARAMS) {
  return beginCell()
    .storeUint(p.structVersion, 8)
    .storeUint(p.paramsVersion, 32)
    .storeUint(p.uniqueId, 32)
    .storeBit(p.isTest)
    .storeCoins(p.pricePerToken)
    .storeCoins(p.workerFeePerToken)
    .storeUint(p.promptTokensPriceMultiplier, 32)
    .storeUint(p.cachedTokensPriceMultiplier, 32)
    .storeUint(p.completionTokensPriceMultiplier, 32)
    .storeUint(p.reasoningTokensPriceMultiplier, 32)
    .storeUint(p.proxyDelayBeforeClose, 32)
    .storeUint(p.clientDelayBeforeClose, 32)
    .storeCoins(p.minProxyStake)
    .storeCoins(p.minClientStake)
    .storeMaybeRef(p.proxyScCode)
    .storeMaybeRef(p.workerScCode)
    .storeMaybeRef(p.clientScCode)
    .endCell();
}

/**
 * Initial storage: `owner:MsgAddress version:uint32 ^data ^params ^governance`.
 * data (FunC order): proxy_hashes registered_proxies last_proxy_seqno worker_hashes model_hashes.
 * governance: upgrade_delay:uint32 pending:(Maybe (code_hash:uint256 not_before:uint32)).
 */
export function rootInitData({
  owner,
  version = 0,
  workerHashes = [],
  modelHashes = [],
  proxyHashes = [],
  params = DEFAULT_PARAMS,
  upgradeDelay = DEFAULT_UPGRADE_DELAY,
}) {
  const data = beginCell()
    .storeDict(hashSet(proxyHashes))
    .storeDict(null) // registered_proxies
    .storeUint(0, 32) // last_proxy_seqno
    .storeDict(hashSet(workerHashes))
    .storeDict(hashSet(modelHashes))
    .endCell();
  const gov = beginCell().storeUint(upgradeDelay, 32).storeBit(false).endCell();
  return beginCell()
    .storeAddress(owner)
    .storeUint(version, 32)
    .storeRef(data)
    .storeRef(paramsCell(params))
    .storeRef(gov)
    .endCell();
}

function header(op, queryId = 0n) {
  return beginCell().storeUint(op, 32).storeUint(queryId, 64);
}

/** `op query_id hash:uint256` for the six add/del hash ops. */
export function hashOpBody(op, hash, queryId = 0n) {
  return header(op, queryId).storeUint(toHashInt(hash), 256).endCell();
}

export const body = {
  addWorkerHash: (h, q) => hashOpBody(OP.ADD_WORKER_HASH, h, q),
  delWorkerHash: (h, q) => hashOpBody(OP.DEL_WORKER_HASH, h, q),
  addModelHash: (h, q) => hashOpBody(OP.ADD_MODEL_HASH, h, q),
  delModelHash: (h, q) => hashOpBody(OP.DEL_MODEL_HASH, h, q),
  addProxyHash: (h, q) => hashOpBody(OP.ADD_PROXY_HASH, h, q),
  delProxyHash: (h, q) => hashOpBody(OP.DEL_PROXY_HASH, h, q),
  registerProxy: (addr, q) => {
    const bytes = Buffer.from(addr, 'utf8');
    if (bytes.length > 127) throw new Error('proxy address longer than 127 bytes');
    return header(OP.REGISTER_PROXY, q).storeUint(0, 1).storeUint(bytes.length, 7).storeBuffer(bytes).endCell();
  },
  unregisterProxy: (seqno, q) => header(OP.UNREGISTER_PROXY, q).storeUint(seqno, 32).endCell(),
  updateProxy: (seqno, addr, q) => {
    const bytes = Buffer.from(addr, 'utf8');
    return header(OP.UPDATE_PROXY, q)
      .storeUint(seqno, 32)
      .storeUint(0, 1)
      .storeUint(bytes.length, 7)
      .storeBuffer(bytes)
      .endCell();
  },
  changeFees: (price, fee, q) => header(OP.CHANGE_FEES, q).storeCoins(price).storeCoins(fee).endCell(),
  changeOwner: (addr, q) => header(OP.CHANGE_OWNER, q).storeAddress(addr).endCell(),
  setCode: (code, q) => header(OP.SET_CODE, q).storeRef(code).endCell(),
  proposeUpgrade: (codeHash, q) => header(OP.PROPOSE_UPGRADE, q).storeUint(toHashInt(codeHash), 256).endCell(),
  cancelUpgrade: (q) => header(OP.CANCEL_UPGRADE, q).endCell(),
  raiseUpgradeDelay: (delay, q) => header(OP.RAISE_UPGRADE_DELAY, q).storeUint(delay, 32).endCell(),
  topUp: () => beginCell().storeUint(OP.TOP_UP, 32).endCell(),
};

/**
 * Decode the external-out events of a transaction (or a list of out messages).
 * Returns `[{ op, name, hash?, seqno?, newOwner?, codeHash?, notBefore?, delay?, paramsVersion? }]`.
 */
export function decodeEvents(outMessages) {
  const names = Object.fromEntries(Object.entries(OP).map(([k, v]) => [v, k]));
  const events = [];
  for (const m of outMessages) {
    if (m.info.type !== 'external-out') continue;
    const s = m.body.beginParse();
    const op = s.loadUint(32);
    const ev = { op, name: names[op] ?? 'UNKNOWN', dest: m.info.dest };
    switch (op) {
      case OP.ADD_WORKER_HASH:
      case OP.DEL_WORKER_HASH:
      case OP.ADD_MODEL_HASH:
      case OP.DEL_MODEL_HASH:
      case OP.ADD_PROXY_HASH:
      case OP.DEL_PROXY_HASH:
      case OP.CANCEL_UPGRADE:
      case OP.SET_CODE:
        ev.hash = s.loadUintBig(256);
        break;
      case OP.REGISTER_PROXY:
      case OP.UNREGISTER_PROXY:
      case OP.UPDATE_PROXY:
        ev.seqno = s.loadUint(32);
        break;
      case OP.CHANGE_FEES:
      case OP.CHANGE_PARAMS:
      case OP.UPDATE_CONTRACT_CODES:
        ev.paramsVersion = s.loadUint(32);
        break;
      case OP.CHANGE_OWNER:
        ev.newOwner = s.loadAddress();
        break;
      case OP.PROPOSE_UPGRADE:
        ev.codeHash = s.loadUintBig(256);
        ev.notBefore = s.loadUint(32);
        break;
      case OP.RAISE_UPGRADE_DELAY:
        ev.delay = s.loadUint(32);
        break;
      default:
        break;
    }
    s.endParse();
    events.push(ev);
  }
  return events;
}
