/**
 * The package entry (`import ... from 'obfuscatune'`): the programmatic API documented in
 * docs/api.md. Only re-exports; every name lives in its own module.
 */

// errors: decide by class, never by message
export {
  ObfuscatuneError, InputError, BundleError, ViewError, StateError, PolicyError, SessionError, IntegrityError,
  AcceleratorError, WorkerError, TransportError, causeChain, findCause,
} from '../errors.js';

// compute backend
export { backendName, availableBackends, setBackend, setThreads, nativeInfo, type BackendName } from '../tensor/gemm.js';

// plain models, checkpoints, tokenizer, data
export { loadCheckpoint, saveCheckpoint, readHFConfig, type LoadOptions, type SaveOptions } from '../model/checkpoint.js';
export type { GPT2Weights } from '../model/weights.js';
export type { GPT2Config } from '../model/config.js';
export { GPT2 } from '../model/gpt2.js';
export { generate, type GenerateOptions, type SampleOptions } from '../model/transformer.js';
export { gpt2Tokenizer, tokenizerFor, type Tokenizer } from '../model/tokenizer.js';
export { parseJsonl, readJsonl, labelSet, encodeRecords, type Record_ as DataRecord, type EncodedSet, type Task } from '../io/jsonl.js';
export { parseMaskSpec, maskSpecLabel, type MaskSpec } from '../linalg/masks.js';

// the provider transform and bundles
export {
  obfuscateWeights, writeObfuscation, deobfuscateDirs, loadAcceleratorBundle, loadEnclaveBundle, checkBundlePair,
  type ObfuscateOptions, type ObfuscationResult,
} from '../obfuscate/provider.js';
export { loadProviderKey, keyFingerprint, type EnclaveBundle, type LoadedAccelerator } from '../obfuscate/bundle.js';
export { shareTable, type ShareRow } from '../obfuscate/share.js';

// split inference: the untrusted side, the link, the trusted side
export { Accelerator, type AcceleratorOptions } from '../accelerator/accelerator.js';
export { InProcessLink, type AcceleratorLink, type CrossingEvent, type Observer } from '../protocol/link.js';
export type { Obfuscated } from '../protocol/messages.js';
export { Enclave, inProcessSplit } from '../enclave/enclave.js';
export type { SplitModel, TrainMode, Method } from '../enclave/split_model.js';

// fine-tuning: the run spec, the session, the loop
export {
  RUN_SPEC_DEFAULTS, RunSpecSchema, RunSpecError, parseRunSpec, mergeRunSpecInputs, readRunSpec, writeRunSpec, resumeRunSpec,
  toSessionOptions, toFinetuneConfig, type RunSpec, type RunSpecInput, type SessionContext,
} from '../train/run_spec.js';
export { buildSession, exportRun, mergedPlainModel, modelFingerprint, type Session, type SessionOptions } from '../train/session.js';
export {
  runFinetune, evaluate, latestCheckpoint, type FinetuneConfig, type FinetuneSummary, type EvalMetrics, type StepMetrics, type RunHooks,
} from '../train/finetune.js';

// the deployment: simulated platform, services, contract, the parties' clients
export { createSimRoot } from '../tee/sim.js';
export { serveAccelerator, type AcceleratorServeOptions } from '../roles/accelerator_service.js';
export { serveEnclave } from '../roles/enclave_server.js';
export type { EnclaveServeOptions } from '../roles/enclave_service.js';
export {
  draftContract, signContract, verifyContract, readContract, writeContract, describeSignatures, type Contract, type DraftOptions,
} from '../roles/contract.js';
export {
  EnclaveClient, enclaveMeasurement, loadOrCreatePartyKey, partyId, uploadAcceleratorBundle, uploadEnclaveBundle, uploadRecords,
  waitForJob, fetchAndMerge, exportAcceleratorWeights, type PartyKey, type EnclaveTrust, type JobSpec,
} from '../roles/parties.js';

// experiments
export { runFidelity, type FidelityRow, type FidelityResult } from '../experiments/fidelity.js';

// PEFT adapters (Hugging Face format), the Llama family, the two defences' settings
export { writePeftAdapter, readPeftAdapter, isPeftAdapterDir, type ImportedAdapter, type PeftExportOptions } from '../model/peft.js';
export { readAdapter, mergeAdapter } from '../train/session.js';
export { Llama } from '../model/llama.js';
export { loadLlamaCheckpoint, saveLlamaCheckpoint } from '../model/llama_checkpoint.js';
export { LLAMA_PRESETS, type LlamaConfig } from '../model/config.js';
export { llamaShareTable, type LlamaShareRow } from '../obfuscate/share_llama.js';
export { MIXING_DEFAULTS, type MixingConfig } from '../enclave/mixing.js';
