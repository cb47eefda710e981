/**
 * Who may ask the enclave service for what (docs/deployment.md): a party is the provider
 * (whose key installed the bundle) or the data owner (whose key uploaded the data).
 */
import { InputError, PolicyError } from '../errors.js';

export type Role = 'provider' | 'owner';

/** The commands and the roles allowed to send each. */
export const POLICY: Record<string, Role[]> = {
  status: ['provider', 'owner'],
  start_finetune: ['owner'],
  infer: ['owner'],
  fetch_update: ['provider'],
};

export interface Parties {
  provider: string | null;
  owner: string | null;
}

/** The sender's role, or a PolicyError when the command is not theirs to send. */
export function authorize(op: string, sender: string, parties: Parties): Role {
  const role: Role | null = sender === parties.provider ? 'provider' : sender === parties.owner ? 'owner' : null;
  const allowed = POLICY[op];
  if (!allowed) throw new InputError(`unknown command "${op}"`);
  if (!role || !allowed.includes(role)) throw new PolicyError(`policy: "${op}" is not allowed for ${role ?? 'an unknown party'}`);
  return role;
}

/** Uploads: one provider installs the bundle, one other party uploads the data. */
export function checkUploader(kind: 'bundle' | 'dataset', sender: string, parties: Parties): void {
  if (kind === 'bundle') {
    if (parties.provider && parties.provider !== sender) throw new PolicyError('a bundle from another provider is already installed');
    return;
  }
  if (parties.owner && parties.owner !== sender) throw new PolicyError('another data owner has already uploaded data');
  if (sender === parties.provider) throw new PolicyError('the provider cannot act as the data owner');
}
