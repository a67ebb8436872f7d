// What each role may see and do, for showing only that: the rows of the API's policy table
// (api/src/auth.rs `access`) that the console uses. The API enforces the table; this copy only
// keeps buttons off the screen of those who would be refused.

import type { Role } from './token';

const STAFF: readonly Role[] = ['admin', 'analyst', 'auditor'];

export const may = {
  /** `GET /orders` (customers and stores: their own) and the tracking of an order. */
  listOrders: ['customer', 'store', ...STAFF] as readonly Role[],
  /** `GET /analytics/*`. */
  viewAnalytics: STAFF,
  /** `GET /projections`, dead letters. */
  viewOperations: STAFF,
  /** `POST /projections/{name}/dead-letters/.../redrive`. */
  redriveDeadLetters: ['admin'] as readonly Role[],
  /** `GET /admin/stuck-flows`. */
  viewStuckFlows: ['admin'] as readonly Role[],
  /** `POST /admin/stuck-flows/{id}/retry|resolve`. */
  manageStuckFlows: ['admin'] as readonly Role[],
};

export function allowed(role: Role, who: readonly Role[]): boolean {
  return who.includes(role);
}
