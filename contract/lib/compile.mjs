// Compiles Tolk sources under contract/ with the pinned @ton/tolk-js (WASM, no network).
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runTolkCompiler, getTolkCompilerVersion } from '@ton/tolk-js';
import { Cell } from '@ton/core';

export const CONTRACT_DIR = join(dirname(fileURLToPath(import.meta.url)), '..');

const cache = new Map();

/**
 * Compile a Tolk entry file (path relative to contract/) and return
 * `{ code: Cell, codeBoc64, codeHashHex, compilerVersion }`.
 * Throws an Error carrying the compiler's message on failure.
 */
export async function compileTolk(entry = 'contracts/root.tolk') {
  if (cache.has(entry)) return cache.get(entry);
  const result = await runTolkCompiler({
    entrypointFileName: entry,
    fsReadCallback: (p) => readFileSync(join(CONTRACT_DIR, p), 'utf-8'),
    withStackComments: false,
  });
  if (result.status === 'error') {
    throw new Error(`Tolk compilation of ${entry} failed:\n${result.message}`);
  }
  const code = Cell.fromBoc(Buffer.from(result.codeBoc64, 'base64'))[0];
  const out = {
    code,
    codeBoc64: result.codeBoc64,
    codeHashHex: code.hash().toString('hex'),
    compilerVersion: await getTolkCompilerVersion(),
  };
  cache.set(entry, out);
  return out;
}

/** Compile the root contract. */
export function compileRoot() {
  return compileTolk('contracts/root.tolk');
}
