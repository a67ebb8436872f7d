// The signed-in token: kept for this tab only (sessionStorage), its claims read for display.
// Reading the claims verifies nothing: the API checks every request, and what it refuses is
// shown as it said it.

export type Role = 'customer' | 'store' | 'courier' | 'admin' | 'analyst' | 'auditor';

export interface Claims {
  sub: string;
  role: Role;
  exp: number;
  iat?: number;
  iss?: string;
  aud?: string;
}

const ROLES: readonly Role[] = ['customer', 'store', 'courier', 'admin', 'analyst', 'auditor'];
const KEY = 'backbone-console-token';

/** The claims of a JWT, or why the text is not a backbone token. */
export function readClaims(token: string): Claims {
  const parts = token.split('.');
  if (parts.length !== 3 || !parts[1]) {
    throw new Error('this is not a JWT (three base64url parts separated by dots); get one with mint-token');
  }
  let payload: unknown;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = base64 + '='.repeat((4 - (base64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    payload = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw new Error('the token’s payload is not base64url-encoded JSON');
  }
  const claims = payload as Partial<Claims>;
  if (typeof claims.role !== 'string' || !ROLES.includes(claims.role as Role)) {
    throw new Error(`the token names no role the API knows (one of ${ROLES.join(', ')})`);
  }
  if (typeof claims.sub !== 'string' || typeof claims.exp !== 'number') {
    throw new Error('the token lacks its subject (sub) or expiry (exp)');
  }
  return claims as Claims;
}

export function storedToken(): string | null {
  return sessionStorage.getItem(KEY);
}

export function storeToken(token: string | null): void {
  if (token === null) sessionStorage.removeItem(KEY);
  else sessionStorage.setItem(KEY, token);
}
