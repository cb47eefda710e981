#!/usr/bin/env bash
# The four-terminal session of docs/deployment.md ("Walkthrough"), run end to end in one
# shell: keys, contract, services, deploy, upload, fine-tune, cancel, fetch. The services run
# in the background; their logs are in $W/*.log. Used by test/cli.test.ts.
#
#   scripts/walkthrough.sh [WORKDIR]
#
# Environment: MODEL (plain GPT-2 checkpoint, default models/base-small), TRAIN (JSONL,
# default the first 160 records of data/wordnet-supersense), STEPS (default 30), MAX_LEN
# (tokens per example, default 32), ACC_PORT and
# ENC_PORT (default 50551, 50552); OBFUSCATUNE_NO_PROGRESS (default 1: no progress lines).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OBF="node $ROOT/bin/obfuscatune.js"
W="${1:-$(mktemp -d /tmp/obf-walk-XXXXXX)}"
MODEL="${MODEL:-$ROOT/models/base-small}"
STEPS="${STEPS:-30}"
MAX_LEN="${MAX_LEN:-32}"
ACC_PORT="${ACC_PORT:-50551}"
ENC_PORT="${ENC_PORT:-50552}"
export OBFUSCATUNE_NO_PROGRESS="${OBFUSCATUNE_NO_PROGRESS:-1}"
mkdir -p "$W"
if [ -z "${TRAIN:-}" ]; then TRAIN="$W/train.jsonl"; head -n 160 "$ROOT/data/wordnet-supersense/train.jsonl" > "$TRAIN"; fi
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
say() { echo; echo "== $*"; }
listening() { for _ in $(seq 1 300); do grep -q '"listening"' "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "no listening line in $1" >&2; cat "${1%.out}.log" >&2; return 1; }

say "provider and owner: keys (each party's own machine)"
P=$($OBF party-key --key "$W/provider/party-key.json")
O=$($OBF party-key --key "$W/owner/key.json")
echo "provider $P"; echo "owner    $O"

say "provider: obfuscate the model (nothing leaves the provider)"
$OBF provider obfuscate --model "$MODEL" --out "$W/provider"

say "contract: the provider drafts and signs, the owner reads and signs"
$OBF contract draft --provider "$P" --owner "$O" --bundles "$W/provider" --methods lora --tasks cls \
  --max-steps 100000 --max-jobs 2 --cancel owner --out "$W/contract.json"
$OBF contract sign --contract "$W/contract.json" --key "$W/provider/party-key.json" --as provider
$OBF contract show --contract "$W/contract.json" | tail -n 2
$OBF contract sign --contract "$W/contract.json" --key "$W/owner/key.json" --as owner

say "cloud operator: platform root (simulated), accelerator (terminal 1), enclave (terminal 2)"
$OBF enclave init-platform --dir "$W/platform"
TRUST="$W/platform/sim-root.pub.pem"
$OBF accelerator serve --state-dir "$W/acc" --port "$ACC_PORT" --contract "$W/contract.json" --trust "$TRUST" > "$W/acc.out" 2> "$W/acc.log" &
PIDS+=($!)
listening "$W/acc.out"
$OBF enclave serve --platform "$W/platform" --state-dir "$W/enc" --accelerator "127.0.0.1:$ACC_PORT" --port "$ENC_PORT" > "$W/enc.out" 2> "$W/enc.log" &
PIDS+=($!)
listening "$W/enc.out"
C=(--enclave "127.0.0.1:$ENC_PORT" --trust "$TRUST" --contract "$W/contract.json")

say "provider (terminal 3): attest, submit the contract, upload both bundles"
$OBF provider deploy "${C[@]}" --key "$W/provider/party-key.json" --bundles "$W/provider" --accelerator "127.0.0.1:$ACC_PORT" --json > "$W/deploy.json"
echo "deployed: $(cut -c1-100 "$W/deploy.json")..."

say "owner (terminal 4): attest, upload encrypted records, start an endless job and cancel it"
$OBF owner upload "${C[@]}" --key "$W/owner/key.json" --train "$TRAIN"
$OBF owner finetune "${C[@]}" --key "$W/owner/key.json" --task cls --method lora --steps 100000 --batch 8 --max-len "$MAX_LEN" --lr 0.002 --checkpoint-every 0 --json > "$W/endless.json" &
FT=$!
for _ in $(seq 1 100); do
  kill -0 "$FT" 2>/dev/null || break
  S=$($OBF owner status "${C[@]}" --key "$W/owner/key.json" --json 2>/dev/null || true)
  echo "$S" | grep -q '"step":[1-9]' && break
  sleep 0.2
done
$OBF owner cancel "${C[@]}" --key "$W/owner/key.json"
wait "$FT"
grep -q '"state":"cancelled"' "$W/endless.json"
echo "the endless job: $(cut -c1-80 "$W/endless.json")..."

say "owner: the real job, $STEPS steps"
$OBF owner finetune "${C[@]}" --key "$W/owner/key.json" --task cls --method lora --steps "$STEPS" --batch 8 --max-len "$MAX_LEN" --lr 0.002 --checkpoint-every 10 --json > "$W/job.json"
grep -q '"state":"done"' "$W/job.json"

say "provider: aggregate metrics, then fetch the update and merge it"
$OBF provider status "${C[@]}" --key "$W/provider/party-key.json" --bundles "$W/provider" --json | cut -c1-200
$OBF provider fetch "${C[@]}" --key "$W/provider/party-key.json" --bundles "$W/provider" --base "$MODEL" --accelerator "127.0.0.1:$ACC_PORT" --out "$W/merged"
test -f "$W/merged/model.safetensors"
say "done: $W"
