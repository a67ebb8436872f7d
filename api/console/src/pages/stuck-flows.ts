// Stuck flows: the order-flow steps the process manager could not take (`/admin/stuck-flows`),
// with why, since when and how often; an admin retries one once the cause is fixed, or
// resolves it (the order is cancelled with compensation, the reason given here).

import { type Context, type Page, every } from '../context';
import { fill, h, relative, table } from '../dom';
import { allowed, may } from '../policy';

interface StuckFlow {
  id: number;
  order_id: string;
  step: string;
  event_type: string;
  command_type: string;
  reason: string;
  status: string;
  attempts: number;
  since: string;
  last_refused_at: string;
  requested_by: string | null;
  note: string | null;
  resolution: string | null;
}

export function stuckFlowsPage({ api, claims, report }: Context): Page {
  const mayManage = allowed(claims.role, may.manageStuckFlows);
  const status = h('select', { 'aria-label': 'Status' },
    h('option', { value: '' }, 'waiting for an operator'),
    ...['open', 'retry_requested', 'resolve_requested', 'retried', 'resolved', 'all'].map((s) => h('option', { value: s }, s)));
  const list = h('div', { 'data-testid': 'stuck-flows' });
  const state = h('span', { class: 'muted' });

  const act = async (flow: StuckFlow, action: 'retry' | 'resolve', reason?: string): Promise<void> => {
    try {
      await api.post(`/admin/stuck-flows/${flow.id}/${action}`, action === 'resolve' ? { reason } : undefined);
      await refresh();
    } catch (e) {
      report(e);
    }
  };

  const actions = (flow: StuckFlow): HTMLElement | null => {
    if (!mayManage || flow.status !== 'open') return null;
    const reason = h('input', { type: 'text', placeholder: 'reason (becomes the cancellation reason)', size: 28, 'aria-label': 'Reason' });
    return h('div', { class: 'actions' },
      h('button', { type: 'button', 'data-testid': `retry-${flow.id}`, onclick: () => void act(flow, 'retry') }, 'Retry'),
      reason,
      h('button', {
        type: 'button',
        onclick: () => {
          if (!reason.value.trim()) {
            report(new Error('resolving cancels the order: give the reason first'));
            return;
          }
          void act(flow, 'resolve', reason.value.trim());
        },
      }, 'Resolve'));
  };

  const refresh = async (): Promise<void> => {
    // Not while someone types a reason.
    if (document.activeElement instanceof HTMLInputElement && list.contains(document.activeElement)) return;
    try {
      const page = await api.get<{ items: StuckFlow[] }>('/admin/stuck-flows', { status: status.value, limit: 200 });
      fill(list, page.items.length === 0
        ? h('p', { class: 'muted' }, 'No stuck flows.')
        : table(['id', 'order', 'step', 'after', 'refused command', 'why', 'status', 'attempts', 'since', ''],
          page.items.map((f) => [
            f.id, h('span', { class: 'mono' }, f.order_id), f.step, f.event_type, f.command_type,
            h('span', { class: 'error-text' }, f.reason), f.resolution ? `${f.status}: ${f.resolution}` : f.status,
            f.attempts, relative(f.since), actions(f),
          ])));
      for (const [index, row] of Array.from(list.querySelectorAll('tbody tr')).entries()) {
        const flow = page.items[index];
        if (flow) row.setAttribute('data-flow-id', String(flow.id));
      }
      state.textContent = `refreshed ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      state.textContent = 'not refreshed';
      report(e);
    }
  };
  status.addEventListener('change', () => void refresh());
  const stop = every(3000, refresh);
  const element = h('div', { class: 'stuck-flows-page' },
    h('div', { class: 'toolbar' }, status, h('span', { class: 'spacer' }), state),
    h('div', { class: 'card' }, list));
  return { element, stop };
}
