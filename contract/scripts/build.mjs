// `npm run build`: compile contracts/root.tolk and write build/root.compiled.json
// ({ compiler, code_boc64, code_hash_hex }). The file is committed so that deployers (the Rust
// publisher, scripts) need no Tolk compiler; test/build.test.mjs checks it matches the source.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { compileRoot, CONTRACT_DIR } from '../lib/compile.mjs';

export async function compiledArtifact() {
  const r = await compileRoot();
  return {
    contract: 'contracts/root.tolk',
    compiler: `@ton/tolk-js ${r.compilerVersion}`,
    code_hash_hex: r.codeHashHex,
    code_boc64: r.codeBoc64,
  };
}

export const ARTIFACT = join(CONTRACT_DIR, 'build', 'root.compiled.json');

if (import.meta.url === `file://${process.argv[1]}`) {
  const a = await compiledArtifact();
  mkdirSync(join(CONTRACT_DIR, 'build'), { recursive: true });
  writeFileSync(ARTIFACT, JSON.stringify(a, null, 2) + '\n');
  process.stdout.write(`wrote ${ARTIFACT}\ncode hash ${a.code_hash_hex}\n`);
}
