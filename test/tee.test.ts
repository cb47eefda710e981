import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  AttestationError,
  canonicalJson,
  verifyEvidence,
  type Evidence,
} from '../src/tee/platform.js';
import {
  SIM_PLATFORM,
  SIM_ROOT_FILES,
  SimSoftwarePlatform,
  SimSoftwareVerifier,
  generateSimRoot,
  createSimRoot,
  loadSimRoot,
  measureDirectory,
  measureFiles,
  type SimRoot,
} from '../src/tee/sim.js';
import {
  EnclaveAttestor,
  attestationReportData,
  attestationRequest,
  newNonce,
  sealToEnclave,
  verifyAttestation,
} from '../src/tee/attest.js';
import {
  HpkeError,
  generateHpkeKeyPair,
  openWith,
  publicKeyFromBase64,
  publicKeyToBase64,
  sealTo,
  sealedFromJson,
  sealedToJson,
} from '../src/tee/hpke.js';
import { ReplayCache, ReplayError } from '../src/tee/replay.js';
import { SealError, readSealedHeader, sealBlob, unsealBlob } from '../src/tee/seal.js';

const enc = new TextEncoder();
const dec = new TextDecoder();

let tmp: string;
before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tee-test-'));
});
after(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

const MEAS_A = 'aa'.repeat(32);
const MEAS_B = 'bb'.repeat(32);

function attestErr(code: string, re: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof AttestationError, `expected AttestationError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, re);
    return true;
  };
}

function flipB64(s: string, byteIndex: number): string {
  const b = Buffer.from(s, 'base64');
  b[byteIndex] ^= 0x01;
  return b.toString('base64');
}

describe('canonical JSON and measurement', () => {
  test('canonicalJson sorts keys and omits undefined members', () => {
    assert.equal(canonicalJson({ b: 1, a: [true, null, 'x'], c: undefined, d: { z: 0, y: -1.5 } }), '{"a":[true,null,"x"],"b":1,"d":{"y":-1.5,"z":0}}');
    assert.throws(() => canonicalJson({ x: NaN }), /non-finite/);
  });

  test('measureDirectory is deterministic and sensitive to code and config', () => {
    const dir = path.join(tmp, 'prog');
    fs.mkdirSync(path.join(dir, 'sub'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'main.js'), 'console.log(1)');
    fs.writeFileSync(path.join(dir, 'sub', 'lib.js'), 'export const x = 1');
    fs.writeFileSync(path.join(dir, 'main.js.map'), '{}');
    const m1 = measureDirectory(dir, { lr: 1e-4, model: 'gpt2' });
    assert.match(m1.hex, /^[0-9a-f]{64}$/);
    assert.deepEqual(m1.files.map((f) => f.path), ['main.js', 'sub/lib.js']);
    // key order of the config does not matter; listing order of files does not matter
    assert.equal(measureDirectory(dir, { model: 'gpt2', lr: 1e-4 }).hex, m1.hex);
    assert.equal(measureFiles(dir, ['sub/lib.js', 'main.js'], { lr: 1e-4, model: 'gpt2' }).hex, m1.hex);
    // source maps are not part of the program by default
    fs.writeFileSync(path.join(dir, 'main.js.map'), '{"changed":true}');
    assert.equal(measureDirectory(dir, { lr: 1e-4, model: 'gpt2' }).hex, m1.hex);
    // config and code both change it
    assert.notEqual(measureDirectory(dir, { lr: 2e-4, model: 'gpt2' }).hex, m1.hex);
    fs.writeFileSync(path.join(dir, 'sub', 'lib.js'), 'export const x = 2');
    assert.notEqual(measureDirectory(dir, { lr: 1e-4, model: 'gpt2' }).hex, m1.hex);
  });
});

describe('simulated platform root', () => {
  test('create, load and trust from files', async () => {
    const dir = path.join(tmp, 'root');
    const created = createSimRoot(dir);
    assert.throws(() => createSimRoot(dir), /EEXIST/);
    const mode = fs.statSync(path.join(dir, SIM_ROOT_FILES.privateKey)).mode & 0o777;
    assert.equal(mode, 0o600);
    const loaded = loadSimRoot(dir);
    assert.deepEqual(loaded.platformSecret, created.platformSecret);
    const platform = new SimSoftwarePlatform(loaded, MEAS_A);
    const verifier = SimSoftwareVerifier.fromPublicKeyFile(path.join(dir, SIM_ROOT_FILES.publicKey));
    const rd = new Uint8Array(64).fill(7);
    const v = await verifyEvidence(await platform.attest(rd), { allowList: [MEAS_A], expectedReportData: rd, verifiers: [verifier] });
    assert.equal(v.platform, SIM_PLATFORM);
    assert.equal(v.simulated, true);
    // sealing keys come from the loaded secret and match the created one
    assert.deepEqual(await platform.sealingKey('x'), await new SimSoftwarePlatform(created, MEAS_A).sealingKey('x'));
  });

  test('sealing keys depend on measurement, label and platform secret', async () => {
    const root = generateSimRoot();
    const a = await new SimSoftwarePlatform(root, MEAS_A).sealingKey('ckpt');
    assert.equal(a.length, 32);
    assert.notDeepEqual(a, await new SimSoftwarePlatform(root, MEAS_B).sealingKey('ckpt'));
    assert.notDeepEqual(a, await new SimSoftwarePlatform(root, MEAS_A).sealingKey('other'));
    assert.notDeepEqual(a, await new SimSoftwarePlatform(generateSimRoot(), MEAS_A).sealingKey('ckpt'));
  });

  test('attest requires exactly 64 bytes of report data', async () => {
    const p = new SimSoftwarePlatform(generateSimRoot(), MEAS_A);
    await assert.rejects(p.attest(new Uint8Array(32)), /64 bytes/);
  });
});

describe('attestation handshake', () => {
  let root: SimRoot;
  let verifier: SimSoftwareVerifier;
  let enclave: EnclaveAttestor;
  before(async () => {
    root = generateSimRoot();
    verifier = new SimSoftwareVerifier(root.publicKey);
    enclave = await EnclaveAttestor.create(new SimSoftwarePlatform(root, MEAS_A));
  });

  test('round trip: verify, then encrypt to the enclave under the transcript', async () => {
    const nonce = newNonce();
    const served = await enclave.handle(attestationRequest(nonce));
    // the response survives a JSON transport
    const response = JSON.parse(JSON.stringify(served.response));
    const attested = await verifyAttestation(response, nonce, { allowList: [MEAS_A], verifiers: [verifier] });
    assert.deepEqual(attested.publicKey, enclave.publicKey);
    assert.deepEqual(attested.transcript, served.transcript);
    assert.equal(attested.transcriptId, served.transcriptId);
    assert.equal(attested.evidence.measurement, MEAS_A);
    assert.equal(attested.evidence.simulated, true);

    const aad = enc.encode('req-1');
    const sealed = await sealToEnclave(attested, enc.encode('private training data'), aad);
    assert.equal(dec.decode(await enclave.open(sealed, served.transcript, aad)), 'private training data');
    // a transcript from another handshake does not open it
    const other = await enclave.attest(newNonce());
    await assert.rejects(enclave.open(sealed, other.transcript, aad), /decryption failed: ciphertext or context tampered/);
  });

  test('a contract hash bound into the report data: verified, and a forged or stripped one fails', async () => {
    const bound = await EnclaveAttestor.create(new SimSoftwarePlatform(root, MEAS_A));
    const h = 'c0'.repeat(32);
    bound.contractSha256 = h;
    const nonce = newNonce();
    const served = await bound.handle(attestationRequest(nonce));
    assert.equal(served.response.contract_sha256, h);
    const opts = { allowList: [MEAS_A], verifiers: [verifier] };
    assert.equal((await verifyAttestation(served.response, nonce, opts)).contractSha256, h);
    await assert.rejects(verifyAttestation({ ...served.response, contract_sha256: 'c1'.repeat(32) }, nonce, opts), attestErr('report_data_mismatch', /report/));
    await assert.rejects(verifyAttestation({ ...served.response, contract_sha256: undefined }, nonce, opts), attestErr('report_data_mismatch', /report/));
    await assert.rejects(verifyAttestation({ ...served.response, contract_sha256: 'xyz' }, nonce, opts), /64 hex digits/);
    // no contract: no field, and the plain report data
    const plain = await enclave.handle(attestationRequest(nonce));
    assert.equal(plain.response.contract_sha256, undefined);
    assert.equal((await verifyAttestation(plain.response, nonce, opts)).contractSha256, null);
  });

  test('the enclave\'s proof towards its accelerator: evidence over the challenge and the contract; client evidence never passes', async () => {
    const { provePeer, verifyPeerProof } = await import('../src/tee/attest.js');
    const platform = new SimSoftwarePlatform(root, MEAS_A);
    const h = 'c0'.repeat(32);
    const challenge = newNonce();
    const opts = { allowList: [MEAS_A], verifiers: [verifier], contractSha256: h };
    const proof = await provePeer(platform, challenge, h);
    assert.equal((await verifyPeerProof(challenge, proof, opts)).measurement, MEAS_A);
    await assert.rejects(verifyPeerProof(newNonce(), proof, opts), attestErr('report_data_mismatch', /report/));
    await assert.rejects(verifyPeerProof(challenge, proof, { ...opts, contractSha256: 'c1'.repeat(32) }), attestErr('report_data_mismatch', /report/));
    await assert.rejects(verifyPeerProof(challenge, proof, { ...opts, allowList: [MEAS_B] }), attestErr('measurement_not_allowed', /allow-list/));
    // a client handshake over the same challenge, with or without the contract, is not a proof
    const bound = await EnclaveAttestor.create(platform);
    bound.contractSha256 = h;
    for (const a of [enclave, bound]) {
      const r = await a.handle(attestationRequest(challenge));
      await assert.rejects(verifyPeerProof(challenge, Buffer.from(JSON.stringify(r.response.evidence)), opts), attestErr('report_data_mismatch', /report/));
    }
    await assert.rejects(verifyPeerProof(challenge, Buffer.from('not json'), opts), attestErr('malformed_evidence', /JSON/));
  });

  test('platform-qualified allow-list entries', async () => {
    const nonce = newNonce();
    const { response } = await enclave.attest(nonce);
    await verifyAttestation(response, nonce, { allowList: [`${SIM_PLATFORM}:${MEAS_A.toUpperCase()}`], verifiers: [verifier] });
    await assert.rejects(
      verifyAttestation(response, nonce, { allowList: [`intel-tdx:${MEAS_A}`], verifiers: [verifier] }),
      attestErr('measurement_not_allowed', /not in allow-list/),
    );
  });

  test('evidence for a measurement outside the allow-list is rejected', async () => {
    const rogue = await EnclaveAttestor.create(new SimSoftwarePlatform(root, MEAS_B));
    const nonce = newNonce();
    const { response } = await rogue.attest(nonce);
    await assert.rejects(
      verifyAttestation(response, nonce, { allowList: [MEAS_A], verifiers: [verifier] }),
      attestErr('measurement_not_allowed', new RegExp(`measurement ${MEAS_B} not in allow-list`)),
    );
  });

  test('stale nonce (replayed evidence) is rejected', async () => {
    const oldNonce = newNonce();
    const { response } = await enclave.attest(oldNonce);
    await assert.rejects(
      verifyAttestation(response, newNonce(), { allowList: [MEAS_A], verifiers: [verifier] }),
      attestErr('report_data_mismatch', /report data mismatch \(stale or replayed nonce\?\)/),
    );
  });

  test('substituted enclave public key is rejected', async () => {
    const nonce = newNonce();
    const { response } = await enclave.attest(nonce);
    const attacker = await generateHpkeKeyPair();
    const mitm = { ...response, enclave_public_key: publicKeyToBase64(attacker.publicKey) };
    await assert.rejects(
      verifyAttestation(mitm, nonce, { allowList: [MEAS_A], verifiers: [verifier] }),
      attestErr('report_data_mismatch', /report data mismatch/),
    );
  });

  test('tampered signature or body is rejected', async () => {
    const nonce = newNonce();
    const { response } = await enclave.attest(nonce);
    const opts = { allowList: [MEAS_A], verifiers: [verifier] };
    const badSig = { ...response, evidence: { ...response.evidence, signature: flipB64(response.evidence.signature, 5) } };
    await assert.rejects(verifyAttestation(badSig, nonce, opts), attestErr('bad_signature', /bad signature/));
    const badBody = { ...response, evidence: { ...response.evidence, body: flipB64(response.evidence.body, 20) } };
    await assert.rejects(verifyAttestation(badBody, nonce, opts), attestErr('bad_signature', /bad signature/));
    // unsigned copies that disagree with the signed body
    const lied = { ...response, evidence: { ...response.evidence, measurement: MEAS_B } };
    await assert.rejects(
      verifyAttestation(lied, nonce, { allowList: [MEAS_A, MEAS_B], verifiers: [verifier] }),
      attestErr('malformed_evidence', /measurement does not match the signed body/),
    );
  });

  test('evidence signed by an untrusted root is rejected', async () => {
    const forger = await EnclaveAttestor.create(new SimSoftwarePlatform(generateSimRoot(), MEAS_A));
    const nonce = newNonce();
    const { response } = await forger.attest(nonce);
    await assert.rejects(
      verifyAttestation(response, nonce, { allowList: [MEAS_A], verifiers: [verifier] }),
      attestErr('bad_signature', /bad signature/),
    );
  });

  test('unknown platform is rejected', async () => {
    const nonce = newNonce();
    const { response } = await enclave.attest(nonce);
    const snp: Evidence = { ...response.evidence, platform: 'amd-sev-snp' };
    await assert.rejects(
      verifyAttestation({ ...response, evidence: snp }, nonce, { allowList: [MEAS_A], verifiers: [verifier] }),
      attestErr('unknown_platform', /unknown platform 'amd-sev-snp'/),
    );
    // no trusted verifier: even sim evidence is unknown
    await assert.rejects(
      verifyAttestation(response, nonce, { allowList: [MEAS_A], verifiers: [] }),
      attestErr('unknown_platform', /unknown platform 'sim-software'/),
    );
  });

  test('malformed evidence is rejected before dispatch', async () => {
    const nonce = newNonce();
    const { response } = await enclave.attest(nonce);
    const short = { ...response, evidence: { ...response.evidence, report_data: 'ab' } };
    await assert.rejects(
      verifyAttestation(short, nonce, { allowList: [MEAS_A], verifiers: [verifier] }),
      attestErr('malformed_evidence', /report_data/),
    );
    const rd = attestationReportData(enclave.publicKey, nonce);
    assert.equal(rd.length, 64);
  });
});

describe('HPKE', () => {
  test('round trip with info and aad; encodings', async () => {
    const kp = await generateHpkeKeyPair();
    assert.equal(kp.publicKey.length, 32);
    assert.equal(kp.privateKey.length, 32);
    assert.deepEqual(publicKeyFromBase64(publicKeyToBase64(kp.publicKey)), kp.publicKey);
    const info = enc.encode('transcript');
    const aad = enc.encode('aad');
    const msg = new Uint8Array(10_000).map((_, i) => i & 0xff);
    const sealed = await sealTo(kp.publicKey, msg, info, aad);
    assert.equal(sealed.enc.length, 32);
    assert.equal(sealed.ciphertext.length, msg.length + 16);
    assert.deepEqual(await openWith(kp.privateKey, sealed, info, aad), msg);
    assert.deepEqual(await openWith(kp.privateKey, sealedFromJson(JSON.parse(JSON.stringify(sealedToJson(sealed)))), info, aad), msg);
    // empty aad default
    const s2 = await sealTo(kp.publicKey, enc.encode('x'), info);
    assert.equal(dec.decode(await openWith(kp.privateKey, s2, info)), 'x');
  });

  test('tampered ciphertext, enc, wrong info, wrong aad or wrong key are rejected', async () => {
    const kp = await generateHpkeKeyPair();
    const info = enc.encode('transcript');
    const aad = enc.encode('aad');
    const sealed = await sealTo(kp.publicKey, enc.encode('secret'), info, aad);
    const tampered = /decryption failed: ciphertext or context tampered/;
    const ct = sealed.ciphertext.slice();
    ct[0] ^= 1;
    await assert.rejects(openWith(kp.privateKey, { ...sealed, ciphertext: ct }, info, aad), tampered);
    const e = sealed.enc.slice();
    e[3] ^= 1;
    await assert.rejects(openWith(kp.privateKey, { ...sealed, enc: e }, info, aad), tampered);
    await assert.rejects(openWith(kp.privateKey, sealed, enc.encode('other transcript'), aad), tampered);
    await assert.rejects(openWith(kp.privateKey, sealed, info, enc.encode('other aad')), tampered);
    await assert.rejects(openWith((await generateHpkeKeyPair()).privateKey, sealed, info, aad), tampered);
    await assert.rejects(openWith(kp.privateKey, sealed, info, aad.subarray(1)), (err: unknown) => err instanceof HpkeError);
    await assert.rejects(sealTo(new Uint8Array(31), enc.encode('x'), info), /32 bytes/);
  });

  test('interoperates with the @hpke/core WebCrypto X25519 KEM', async () => {
    const core = await import('@hpke/core');
    const suite = new core.CipherSuite({ kem: new core.DhkemX25519HkdfSha256(), kdf: new core.HkdfSha256(), aead: new core.Aes256Gcm() });
    const kp = await generateHpkeKeyPair();
    const info = enc.encode('i');
    const out = await suite.seal({ recipientPublicKey: await suite.kem.deserializePublicKey(kp.publicKey), info }, enc.encode('hello'), enc.encode('a'));
    const pt = await openWith(kp.privateKey, { enc: new Uint8Array(out.enc), ciphertext: new Uint8Array(out.ct) }, info, enc.encode('a'));
    assert.equal(dec.decode(pt), 'hello');
  });
});

describe('replay cache', () => {
  test('rejects a replayed id and forgets it after the window', () => {
    let now = 1_000_000;
    const c = new ReplayCache({ ttlMs: 1000, now: () => now });
    c.check('req-1');
    c.check(new Uint8Array([1, 2, 3]));
    assert.throws(() => c.check('req-1'), (err: unknown) => err instanceof ReplayError && err.code === 'replayed' && /replay detected/.test(err.message));
    assert.throws(() => c.check(new Uint8Array([1, 2, 3])), /replay detected/);
    now += 1001;
    c.check('req-1');
  });

  test('issue times outside the window are rejected; ids live until issuedAt + ttl', () => {
    let now = 5_000_000;
    const c = new ReplayCache({ ttlMs: 1000, maxSkewMs: 100, now: () => now });
    assert.throws(() => c.check('old', now - 1001), (err: unknown) => err instanceof ReplayError && err.code === 'expired');
    assert.throws(() => c.check('future', now + 101), (err: unknown) => err instanceof ReplayError && err.code === 'future');
    const issued = now;
    c.check('r', issued);
    now += 999;
    assert.throws(() => c.check('r', issued), /replay detected/);
    now += 2;
    // forgotten, but now too old to pass the timestamp check
    assert.throws(() => c.check('r', issued), (err: unknown) => err instanceof ReplayError && err.code === 'expired');
  });

  test('bounded: fails closed when full of live ids, reuses expired slots', () => {
    let now = 0;
    const c = new ReplayCache({ ttlMs: 100, maxEntries: 3, now: () => now });
    c.check('a');
    c.check('b');
    c.check('c');
    assert.throws(() => c.check('d'), (err: unknown) => err instanceof ReplayError && err.code === 'cache_full');
    now = 101;
    c.check('d');
    assert.ok(c.size <= 3);
  });
});

describe('sealing', () => {
  test('round trip, header, and failures', async () => {
    const root = generateSimRoot();
    const pa = new SimSoftwarePlatform(root, MEAS_A);
    const data = enc.encode('adapter weights');
    const blob = await sealBlob(pa, 'ckpt', data);
    const header = readSealedHeader(blob);
    assert.equal(header.label, 'ckpt');
    assert.equal(header.measurement, MEAS_A);
    assert.equal(header.platform, SIM_PLATFORM);
    assert.deepEqual(await unsealBlob(pa, 'ckpt', blob), data);
    // a fresh platform object with the same root and program unseals it (e.g. after restart)
    assert.deepEqual(await unsealBlob(new SimSoftwarePlatform(root, MEAS_A), 'ckpt', blob), data);

    const sealErr = (code: string, re: RegExp) => (err: unknown) => err instanceof SealError && err.code === code && re.test(err.message);
    // another program on the same platform
    const pb = new SimSoftwarePlatform(root, MEAS_B);
    await assert.rejects(unsealBlob(pb, 'ckpt', blob), sealErr('measurement_mismatch', /a different program cannot unseal/));
    // ... even if the header is rewritten to claim its measurement
    const forged = Buffer.from(blob);
    const at = forged.indexOf(MEAS_A);
    Buffer.from(MEAS_B).copy(forged, at);
    await assert.rejects(unsealBlob(pb, 'ckpt', forged), sealErr('auth_failed', /unseal failed/));
    // same program on another machine (different platform secret)
    await assert.rejects(unsealBlob(new SimSoftwarePlatform(generateSimRoot(), MEAS_A), 'ckpt', blob), sealErr('auth_failed', /unseal failed/));
    // wrong label
    await assert.rejects(unsealBlob(pa, 'other', blob), sealErr('label_mismatch', /label/));
    // tampered ciphertext
    const t = blob.slice();
    t[t.length - 20] ^= 1;
    await assert.rejects(unsealBlob(pa, 'ckpt', t), sealErr('auth_failed', /tampered/));
    // not a blob
    await assert.rejects(unsealBlob(pa, 'ckpt', enc.encode('hello world, not sealed')), sealErr('malformed', /bad magic/));
  });
});
