// Live orders: the `/orders` list (refreshed every few seconds, filtered by status and region)
// and one order at a time: its tracking view, then its changes as they happen over
// `/orders/{id}/tracking/stream` (status changes extend the timeline; delivery updates refresh
// the position/ETA panel). The stream reconnects with Last-Event-ID when it drops.

import { ApiProblem } from '../api';
import { type Context, type Page, every } from '../context';
import { fill, h, money, relative, table, time } from '../dom';
import { readEventStream } from '../sse';

interface OrderSummary {
  order_id: string;
  customer_id: string;
  store_id: string;
  region: string;
  status: string;
  total_minor: number;
  currency: string;
  placed_at: string;
  updated_at: string;
}

interface TimelineEntry {
  sequence: number;
  event_type: string;
  status: string;
  at: string;
}

interface Delivery {
  status: string;
  courier_id: string | null;
  courier_position: { latitude: number; longitude: number; at: string } | null;
  eta: {
    expected_at: string;
    earliest_at: string;
    latest_at: string;
    remaining_meters: number;
    estimated_at: string;
  } | null;
  updated_at: string;
  sequence: number;
}

interface Line {
  item_id: string;
  name: string;
  quantity: number;
  options: string[];
  line_total: { minor: number; currency: string };
}

interface Tracking {
  order_id: string;
  customer_id: string;
  store_id: string;
  region: string;
  status: string;
  items: Line[];
  total: { minor: number; currency: string };
  placed_at: string;
  updated_at: string;
  sequence: number;
  timeline: TimelineEntry[];
  delivery: Delivery | null;
}

const STATUSES = [
  'Placed', 'Confirmed', 'Accepted', 'Preparing', 'Ready', 'OutForDelivery', 'Delivered', 'Completed', 'Rejected', 'Cancelled',
];
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function statusBadge(status: string, attrs: Record<string, string> = {}): HTMLElement {
  return h('span', { class: `status status-${status.toLowerCase()}`, ...attrs }, status);
}

export function ordersPage({ api, report }: Context): Page {
  const statusFilter = h('select', { 'aria-label': 'Status' }, h('option', { value: '' }, 'any status'),
    ...STATUSES.map((s) => h('option', { value: s }, s)));
  const regionFilter = h('input', { type: 'text', placeholder: 'region, e.g. uk', 'aria-label': 'Region', size: 12 });
  const findInput = h('input', { type: 'text', placeholder: 'order id', 'aria-label': 'Order id', size: 38, 'data-testid': 'find-order' });
  const list = h('div', { class: 'order-list', 'data-testid': 'order-list' });
  const listState = h('span', { class: 'muted' });
  const detail = h('div', { class: 'order-detail card', 'data-testid': 'order-detail' },
    h('p', { class: 'muted' }, 'Pick an order in the list, or find one by id.'));

  let selected: string | null = null;
  let stream: AbortController | null = null;
  let rows: OrderSummary[] = [];

  const renderList = (): void => {
    fill(list, rows.length === 0
      ? h('p', { class: 'muted' }, 'No orders match.')
      : table(['order', 'status', 'region', 'total', 'placed', 'updated'], rows.map((o) => [
          h('button', { type: 'button', class: 'link mono', onclick: () => openOrder(o.order_id) }, o.order_id),
          statusBadge(o.status),
          o.region,
          money(o.total_minor, o.currency),
          time(o.placed_at),
          relative(o.updated_at),
        ]), { class: 'orders' }));
    for (const [index, row] of Array.from(list.querySelectorAll('tbody tr')).entries()) {
      const order = rows[index];
      if (!order) continue;
      row.setAttribute('data-order-id', order.order_id);
      row.classList.toggle('selected', order.order_id === selected);
    }
  };

  const refreshList = async (): Promise<void> => {
    try {
      const page = await api.get<{ items: OrderSummary[] }>('/orders', {
        limit: 50,
        status: statusFilter.value,
        region: regionFilter.value.trim(),
      });
      rows = page.items;
      listState.textContent = `${rows.length} newest · refreshed ${new Date().toLocaleTimeString()}`;
      renderList();
    } catch (e) {
      listState.textContent = 'not refreshed';
      report(e);
    }
  };

  const openOrder = (orderId: string): void => {
    stream?.abort();
    stream = new AbortController();
    selected = orderId;
    renderList();
    void follow(orderId, stream.signal);
  };

  /** The tracking view, then its stream, until another order is opened. */
  const follow = async (orderId: string, signal: AbortSignal): Promise<void> => {
    const status = h('span', { 'data-testid': 'order-status' });
    const timeline = h('ol', { class: 'timeline', 'data-testid': 'timeline' });
    const delivery = h('div', { class: 'delivery', 'data-testid': 'delivery' });
    const facts = h('dl', { class: 'facts' });
    const items = h('div');
    const streamState = h('span', { class: 'stream-state', 'data-testid': 'stream-state' }, 'connecting…');
    fill(detail,
      h('div', { class: 'detail-head' },
        h('h2', {}, 'Order ', h('span', { class: 'mono' }, orderId)),
        status, streamState),
      facts, items,
      h('div', { class: 'columns' },
        h('section', {}, h('h3', {}, 'Timeline'), timeline),
        h('section', {}, h('h3', {}, 'Delivery'), delivery)));

    let last = 0;
    const setStatus = (value: string): void => {
      fill(status, statusBadge(value));
      status.dataset.status = value;
      const row = rows.find((o) => o.order_id === orderId);
      if (row && row.status !== value) {
        row.status = value;
        renderList();
      }
    };
    const addEntry = (entry: TimelineEntry): void => {
      if (entry.sequence <= last) return;
      last = entry.sequence;
      timeline.append(h('li', { 'data-sequence': entry.sequence },
        statusBadge(entry.status), ' ', h('span', { class: 'muted' }, `${entry.event_type} · ${time(entry.at)}`)));
      setStatus(entry.status);
    };

    try {
      const view = await api.get<Tracking>(`/orders/${encodeURIComponent(orderId)}/tracking`);
      if (signal.aborted) return;
      fill(facts,
        h('dt', {}, 'region'), h('dd', {}, view.region),
        h('dt', {}, 'store'), h('dd', { class: 'mono' }, view.store_id),
        h('dt', {}, 'customer'), h('dd', { class: 'mono' }, view.customer_id),
        h('dt', {}, 'total'), h('dd', {}, money(view.total.minor, view.total.currency)),
        h('dt', {}, 'placed'), h('dd', {}, time(view.placed_at)));
      fill(items, table(['item', 'qty', 'options', 'line total'], view.items.map((line) => [
        line.name, line.quantity, line.options.join(', ') || '–', money(line.line_total.minor, line.line_total.currency),
      ]), { class: 'compact' }));
      setStatus(view.status);
      for (const entry of view.timeline) addEntry(entry);
      renderDelivery(delivery, view.delivery);
    } catch (e) {
      if (signal.aborted) return;
      if (!(e instanceof ApiProblem) || e.status !== 404) {
        report(e);
        streamState.textContent = 'not followed';
        return;
      }
      // Not projected yet: the stream tells its history from the start.
      fill(facts, h('dd', { class: 'muted' }, 'not in the tracking view yet; following its stream'));
    }

    let delay = 1000;
    while (!signal.aborted) {
      try {
        const headers: Record<string, string> = { ...api.authorization };
        if (last > 0) headers['last-event-id'] = String(last);
        await readEventStream(
          api.url(`/orders/${encodeURIComponent(orderId)}/tracking/stream`),
          headers,
          signal,
          () => {
            streamState.textContent = '● live';
            streamState.classList.add('live');
            delay = 1000;
          },
          (event) => {
            if (event.event === 'status') addEntry(JSON.parse(event.data) as TimelineEntry);
            else if (event.event === 'delivery') renderDelivery(delivery, JSON.parse(event.data) as Delivery);
          },
        );
      } catch (e) {
        if (signal.aborted) return;
        if (e instanceof ApiProblem && e.status !== 0 && e.status !== 429 && e.status < 500) {
          report(e);
          streamState.textContent = 'stream refused';
          streamState.classList.remove('live');
          return;
        }
      }
      if (signal.aborted) return;
      streamState.classList.remove('live');
      streamState.textContent = `reconnecting in ${delay / 1000} s`;
      await new Promise((resolve) => window.setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 15000);
    }
  };

  const find = (): void => {
    const id = findInput.value.trim().toLowerCase();
    if (!UUID.test(id)) {
      report(new ApiProblem(0, 'Not an order id', `\`${id}\` is not a UUID such as 0190f7c1-2b3c-7d4e-8f90-123456789abc`));
      return;
    }
    report(null);
    openOrder(id);
  };
  findInput.addEventListener('keydown', (event) => {
    if (event.key === 'Enter') find();
  });
  statusFilter.addEventListener('change', () => void refreshList());
  regionFilter.addEventListener('change', () => void refreshList());

  const stopList = every(3000, refreshList);
  const element = h('div', { class: 'orders-page' },
    h('div', { class: 'toolbar' },
      findInput, h('button', { type: 'button', onclick: find }, 'Find'),
      h('span', { class: 'spacer' }),
      statusFilter, regionFilter, listState),
    h('div', { class: 'split' }, list, detail));
  return {
    element,
    stop: () => {
      stopList();
      stream?.abort();
    },
  };
}

function renderDelivery(panel: HTMLElement, delivery: Delivery | null): void {
  if (!delivery) {
    fill(panel, h('p', { class: 'muted' }, 'No delivery requested yet.'));
    return;
  }
  const position = delivery.courier_position;
  const eta = delivery.eta;
  const facts = h('dl', { class: 'facts' },
    h('dt', {}, 'status'), h('dd', { 'data-testid': 'delivery-status' }, statusBadge(delivery.status)),
    h('dt', {}, 'courier'), h('dd', { class: 'mono' }, delivery.courier_id ?? 'not assigned'),
    h('dt', {}, 'position'),
    h('dd', { 'data-testid': 'courier-position' }, position
      ? `${position.latitude.toFixed(5)}, ${position.longitude.toFixed(5)} (fix ${relative(position.at)})`
      : 'no fix yet'),
    h('dt', {}, 'ETA'),
    h('dd', { 'data-testid': 'eta' }, eta
      ? `${new Date(eta.expected_at).toLocaleTimeString()} (${relative(eta.expected_at)}), between ${new Date(eta.earliest_at).toLocaleTimeString()} and ${new Date(eta.latest_at).toLocaleTimeString()}`
      : '–'),
    h('dt', {}, 'distance left'),
    h('dd', {}, eta ? `${(eta.remaining_meters / 1000).toFixed(2)} km` : '–'),
    h('dt', {}, 'updated'), h('dd', {}, time(delivery.updated_at)));
  const children: HTMLElement[] = [facts];
  if (eta) {
    // The arrival window on a line: earliest … expected … latest, and where "now" is.
    const earliest = new Date(eta.earliest_at).getTime();
    const latest = new Date(eta.latest_at).getTime();
    const span = Math.max(latest - earliest, 1);
    const at = (t: number): string => `${Math.min(100, Math.max(0, ((t - earliest) / span) * 100)).toFixed(1)}%`;
    const expected = h('span', { class: 'marker expected', title: 'expected' });
    const now = h('span', { class: 'marker now', title: 'now' });
    expected.style.left = at(new Date(eta.expected_at).getTime());
    now.style.left = at(Date.now());
    children.push(h('div', { class: 'window', 'aria-label': 'arrival window' }, expected, now),
      h('div', { class: 'window-labels muted' },
        h('span', {}, new Date(earliest).toLocaleTimeString()), h('span', {}, new Date(latest).toLocaleTimeString())));
  }
  fill(panel, ...children);
}
