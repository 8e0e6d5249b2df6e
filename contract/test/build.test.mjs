// The committed build/root.compiled.json must match a fresh compilation of the source.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { compiledArtifact, ARTIFACT } from '../scripts/build.mjs';
import { runTolkCompiler } from '@ton/tolk-js';

test('committed build/root.compiled.json is up to date (else run `npm run build`)', async () => {
  const committed = JSON.parse(readFileSync(ARTIFACT, 'utf8'));
  const fresh = await compiledArtifact();
  assert.deepEqual(committed, fresh, 'build/root.compiled.json is stale: run `npm run build` in contract/');
});

test('compilation is deterministic (a second, independent compilation gives the same code)', async () => {
  const src = { 'contracts/root.tolk': readFileSync(new URL('../contracts/root.tolk', import.meta.url), 'utf8') };
  const again = await runTolkCompiler({ entrypointFileName: 'contracts/root.tolk', fsReadCallback: (p) => src[p] });
  assert.equal(again.status, 'ok');
  assert.equal(again.codeBoc64, (await compiledArtifact()).code_boc64);
});
