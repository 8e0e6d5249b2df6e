// In-process tests of the local chain builder: a given mnemonic gives stable addresses.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Address } from '@ton/core';
import { mnemonicToPrivateKey } from '@ton/crypto';
import { WalletContractV4, WalletContractV5R1 } from '@ton/ton';
import { createLocalChain } from '../chain/localchain.mjs';

// A throw-away test mnemonic (never funded anywhere but in the sandbox).
const WORDS = 'acid movie clown quote aim fluid tackle three palm focus erupt glory drink gift mix sell initial quarter ranch salmon canvas gather iron voyage'.split(' ');

test('a given mnemonic yields the derived wallet and a deterministic root address', async () => {
  const keys = await mnemonicToPrivateKey(WORDS);
  const a = await createLocalChain({ mnemonic: WORDS, upgradeDelay: 60 });
  assert.equal(a.info.wallet.mnemonic, WORDS.join(' '));
  assert.equal(a.info.wallet.mnemonic_generated, false);
  assert.ok(Address.parse(a.info.wallet.address).equals(WalletContractV4.create({ workchain: 0, publicKey: keys.publicKey }).address));
  const b = await createLocalChain({ mnemonic: WORDS, upgradeDelay: 60 });
  assert.equal(a.info.root.address, b.info.root.address, 'same owner and delay give the same root address');
  const w = await a.call('getWalletInformation', { address: a.info.wallet.address });
  assert.equal(w.seqno, 0);
  const owner = await a.call('runGetMethod', { address: a.info.root.address, method: 'get_upgrade_state', stack: [] });
  assert.deepEqual(owner.stack, [['num', '0x3c'], ['num', '0x0'], ['num', '0x0']]);
});

test('v5r1 team wallet is supported', async () => {
  const keys = await mnemonicToPrivateKey(WORDS);
  const c = await createLocalChain({ mnemonic: WORDS, walletVersion: 'v5r1' });
  assert.ok(Address.parse(c.info.wallet.address).equals(WalletContractV5R1.create({ workchain: 0, publicKey: keys.publicKey }).address));
  const w = await c.call('getWalletInformation', { address: c.info.wallet.address });
  assert.equal(w.wallet_type, 'wallet v5 r1');
});

test('an invalid mnemonic or wallet version is refused with a helpful error', async () => {
  await assert.rejects(createLocalChain({ mnemonic: ['not', 'a', 'mnemonic'] }), /not a valid TON mnemonic/);
  await assert.rejects(createLocalChain({ mnemonic: WORDS, walletVersion: 'v3' }), /use v4r2 or v5r1/);
});
