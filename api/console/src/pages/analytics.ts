// Analytics: the `/analytics/summary` figures (orders, completions, cancellations, revenue,
// acceptance and delivery-time percentiles) per placement hour as uPlot charts, or per region
// or store as bars, in the API's time range and filters; and `/analytics/cancellations`.
// Money is never summed across currencies: the charts show one currency at a time (those in
// the range are offered), as the API keeps them.

import uPlot from 'uplot';

import { type Context, type Page, every } from '../context';
import { fill, h, money, seconds, table } from '../dom';

interface Percentiles {
  p50: number;
  p90: number;
  p99: number;
}

interface SummaryRow {
  region?: string;
  store_id?: string;
  hour?: string;
  currency: string;
  orders: number;
  completed: number;
  cancelled: number;
  rejected: number;
  revenue_minor: number;
  aov_minor: number | null;
  acceptance_seconds: Percentiles | null;
  delivery_seconds: Percentiles | null;
}

interface Summary {
  group_by: string;
  rows: SummaryRow[];
  next_cursor: string | null;
}

interface Cancellations {
  cancelled: number;
  rejected: number;
  by_party: { cancelled_by: string; count: number }[];
  reasons: { cancelled_by: string; reason: string; count: number }[];
  rejections: { reason: string; count: number }[];
}

const HOUR = 3600_000;
const COLOURS = ['#2563eb', '#16a34a', '#dc2626', '#9333ea', '#ea580c', '#0891b2'];

/** `2026-12-07T13:00` (UTC) for a datetime-local input. */
function hourInput(ms: number): string {
  return new Date(ms).toISOString().slice(0, 13) + ':00';
}

function parseHourInput(value: string): number | null {
  const ms = Date.parse(`${value}:00Z`);
  return Number.isNaN(ms) ? null : Math.floor(ms / HOUR) * HOUR;
}

function minorDigits(currency: string): number {
  try {
    return new Intl.NumberFormat('en', { style: 'currency', currency }).resolvedOptions().maximumFractionDigits ?? 2;
  } catch {
    return 2;
  }
}

/** One uPlot time chart that keeps its canvas between refreshes. */
class TimeChart {
  readonly element: HTMLElement;
  private plot: uPlot | null = null;
  private shape = '';
  private readonly observer: ResizeObserver;

  constructor(
    readonly title: string,
    testId: string,
    private readonly unit: string,
  ) {
    this.element = h('figure', { class: 'chart', 'data-testid': testId }, h('figcaption', {}, title));
    this.observer = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.observer.observe(this.element);
  }

  private size(): { width: number; height: number } {
    return { width: Math.max(this.element.clientWidth - 16, 240), height: 220 };
  }

  show(x: number[], series: { label: string; values: (number | null)[] }[]): void {
    const shape = series.map((s) => s.label).join('|');
    const data: uPlot.AlignedData = [x, ...series.map((s) => s.values)];
    // What is plotted, summed per series (for people reading the page's markup, and its test).
    this.element.dataset.sums = JSON.stringify(
      Object.fromEntries(series.map((s) => [s.label, s.values.reduce<number>((sum, v) => sum + (v ?? 0), 0)])),
    );
    if (this.plot && shape === this.shape) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    this.shape = shape;
    this.plot = new uPlot(
      {
        ...this.size(),
        // Hours in UTC, as the API keeps them and the range is given.
        tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), 'Etc/UTC'),
        scales: { x: { time: true }, y: { range: (_u, min, max) => [Math.min(0, min ?? 0), Math.max(1, (max ?? 1) * 1.1)] } },
        axes: [{}, { label: this.unit, size: 60 }],
        series: [
          { label: 'hour (UTC)' },
          ...series.map((s, i) => ({
            label: s.label,
            stroke: COLOURS[i % COLOURS.length],
            width: 2,
            spanGaps: false,
            points: { show: true, size: 5 },
          })),
        ],
      },
      data,
      this.element,
    );
  }

  destroy(): void {
    this.observer.disconnect();
    this.plot?.destroy();
  }
}

/** Horizontal bars, one per group, for region and store groupings. */
function bars(title: string, testId: string, entries: { key: string; value: number; text: string }[]): HTMLElement {
  const max = Math.max(1, ...entries.map((e) => e.value));
  return h('figure', { class: 'chart bars', 'data-testid': testId }, h('figcaption', {}, title),
    ...entries.map((entry) => {
      const bar = h('span', { class: 'bar' });
      bar.style.width = `${((entry.value / max) * 100).toFixed(1)}%`;
      return h('div', { class: 'bar-row' }, h('span', { class: 'bar-key mono' }, entry.key), h('span', { class: 'bar-track' }, bar),
        h('span', { class: 'bar-value' }, entry.text));
    }),
    entries.length === 0 ? h('p', { class: 'muted' }, 'Nothing in this range.') : null);
}

export function analyticsPage({ api, report }: Context): Page {
  const now = Math.floor(Date.now() / HOUR) * HOUR;
  const preset = h('select', { 'aria-label': 'Range' },
    h('option', { value: '6' }, 'last 6 hours'),
    h('option', { value: '24', selected: true }, 'last 24 hours'),
    h('option', { value: '168' }, 'last 7 days'),
    h('option', { value: 'custom' }, 'custom'));
  const from = h('input', { type: 'datetime-local', step: 3600, 'aria-label': 'From (UTC)', value: hourInput(now - 23 * HOUR) });
  const to = h('input', { type: 'datetime-local', step: 3600, 'aria-label': 'To (UTC)', value: hourInput(now + HOUR) });
  const groupBy = h('select', { 'aria-label': 'Group by', 'data-testid': 'group-by' },
    h('option', { value: 'hour' }, 'per hour'), h('option', { value: 'region' }, 'per region'), h('option', { value: 'store' }, 'per store'));
  const region = h('input', { type: 'text', placeholder: 'region', size: 10, 'aria-label': 'Region' });
  const store = h('input', { type: 'text', placeholder: 'store id', size: 36, 'aria-label': 'Store id' });
  const currency = h('select', { 'aria-label': 'Currency', 'data-testid': 'currency' });
  const live = h('input', { type: 'checkbox', checked: true, 'aria-label': 'Refresh every 5 s' });
  const totals = h('div', { 'data-testid': 'analytics-totals' });
  const charts = h('div', { class: 'charts' });
  const cancellations = h('div', { class: 'card', 'data-testid': 'cancellations' });
  const state = h('span', { class: 'muted' });

  const timeCharts = {
    orders: new TimeChart('Orders placed, completed and cancelled', 'chart-orders', 'orders'),
    revenue: new TimeChart('Revenue of completed orders', 'chart-revenue', 'revenue'),
    acceptance: new TimeChart('Acceptance time (placed → accepted), percentiles', 'chart-acceptance', 'seconds'),
    delivery: new TimeChart('Delivery time (placed → delivered), percentiles', 'chart-delivery', 'seconds'),
  };

  const range = (): { from: number; to: number } | null => {
    if (preset.value !== 'custom') {
      const hours = Number(preset.value);
      const end = Math.floor(Date.now() / HOUR) * HOUR + HOUR;
      from.value = hourInput(end - hours * HOUR);
      to.value = hourInput(end);
    }
    const start = parseHourInput(from.value);
    const end = parseHourInput(to.value);
    if (start === null || end === null || start >= end) {
      report(new Error('the range needs a start before its end (whole UTC hours)'));
      return null;
    }
    return { from: start, to: end };
  };

  const refresh = async (): Promise<void> => {
    const bounds = range();
    if (!bounds) return;
    const filters = {
      from: new Date(bounds.from).toISOString(),
      to: new Date(bounds.to).toISOString(),
      region: region.value.trim(),
      store_id: store.value.trim(),
    };
    try {
      // Every currency in the range: the totals, and the currencies to chart.
      const all = await api.get<Summary>('/analytics/summary', { ...filters, group_by: 'none', limit: 500 });
      const currencies = all.rows.map((r) => r.currency);
      const chosen = currencies.includes(currency.value) ? currency.value : currencies[0] ?? '';
      fill(currency, ...currencies.map((c) => h('option', { value: c, selected: c === chosen }, c)));
      fill(totals, all.rows.length === 0
        ? h('p', { class: 'muted' }, 'No orders placed in this range.')
        : table(['currency', 'orders', 'completed', 'cancelled', 'revenue', 'average order', 'acceptance p50 / p90', 'delivery p50 / p90'],
          all.rows.map((r) => [
            r.currency, h('span', { 'data-testid': `orders-${r.currency}` }, r.orders), r.completed, r.cancelled,
            money(r.revenue_minor, r.currency), r.aov_minor === null ? '–' : money(r.aov_minor, r.currency),
            r.acceptance_seconds ? `${seconds(r.acceptance_seconds.p50)} / ${seconds(r.acceptance_seconds.p90)}` : '–',
            r.delivery_seconds ? `${seconds(r.delivery_seconds.p50)} / ${seconds(r.delivery_seconds.p90)}` : '–',
          ]), { class: 'compact' }));

      const scoped = { ...filters, currency: chosen || undefined };
      const grouped = await api.get<Summary>('/analytics/summary', { ...scoped, group_by: groupBy.value, limit: 500 });
      if (groupBy.value === 'hour') showHours(grouped.rows, bounds, chosen);
      else showGroups(grouped.rows, chosen);

      const cancelled = await api.get<Cancellations>('/analytics/cancellations', { ...scoped, limit: 10 });
      fill(cancellations,
        h('h3', {}, `Cancellations: ${cancelled.cancelled} (of which ${cancelled.rejected} rejected by the store)`),
        h('div', { class: 'columns' },
          bars('Cancelled by', 'cancelled-by', cancelled.by_party.map((p) => ({ key: p.cancelled_by, value: p.count, text: String(p.count) }))),
          bars('Store rejections', 'rejections', cancelled.rejections.map((r) => ({ key: r.reason, value: r.count, text: String(r.count) })))),
        cancelled.reasons.length === 0 ? null
          : table(['by', 'reason', 'orders'], cancelled.reasons.map((r) => [r.cancelled_by, r.reason, r.count]), { class: 'compact' }));
      state.textContent = `refreshed ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      state.textContent = 'not refreshed';
      report(e);
    }
  };

  const showHours = (rows: SummaryRow[], bounds: { from: number; to: number }, chosen: string): void => {
    const x: number[] = [];
    for (let t = bounds.from; t < bounds.to; t += HOUR) x.push(t / 1000);
    const byHour = new Map(rows.map((r) => [Math.floor(Date.parse(r.hour ?? '') / 1000), r]));
    const pick = (f: (r: SummaryRow) => number | null): (number | null)[] => x.map((t) => {
      const row = byHour.get(t);
      return row ? f(row) : null;
    });
    const count = (f: (r: SummaryRow) => number): number[] => x.map((t) => {
      const row = byHour.get(t);
      return row ? f(row) : 0;
    });
    const scale = 10 ** minorDigits(chosen || 'EUR');
    fill(charts, ...Object.values(timeCharts).map((c) => c.element));
    timeCharts.orders.show(x, [
      { label: 'placed', values: count((r) => r.orders) },
      { label: 'completed', values: count((r) => r.completed) },
      { label: 'cancelled', values: count((r) => r.cancelled) },
    ]);
    timeCharts.revenue.show(x, [{ label: `revenue (${chosen || '–'})`, values: count((r) => r.revenue_minor / scale) }]);
    timeCharts.acceptance.show(x, (['p50', 'p90', 'p99'] as const).map((p) => ({
      label: p, values: pick((r) => r.acceptance_seconds?.[p] ?? null),
    })));
    timeCharts.delivery.show(x, (['p50', 'p90', 'p99'] as const).map((p) => ({
      label: p, values: pick((r) => r.delivery_seconds?.[p] ?? null),
    })));
  };

  const showGroups = (rows: SummaryRow[], chosen: string): void => {
    const key = (r: SummaryRow): string => r.region ?? r.store_id ?? '–';
    const p90 = (p: Percentiles | null): number => p?.p90 ?? 0;
    fill(charts,
      bars('Orders placed', 'chart-orders', rows.map((r) => ({ key: key(r), value: r.orders, text: `${r.orders} (${r.completed} completed, ${r.cancelled} cancelled)` }))),
      bars(`Revenue (${chosen})`, 'chart-revenue', rows.map((r) => ({ key: key(r), value: r.revenue_minor, text: money(r.revenue_minor, r.currency) }))),
      bars('Acceptance time p90', 'chart-acceptance', rows.map((r) => ({
        key: key(r), value: p90(r.acceptance_seconds),
        text: r.acceptance_seconds ? `p50 ${seconds(r.acceptance_seconds.p50)} · p90 ${seconds(r.acceptance_seconds.p90)} · p99 ${seconds(r.acceptance_seconds.p99)}` : '–',
      }))),
      bars('Delivery time p90', 'chart-delivery', rows.map((r) => ({
        key: key(r), value: p90(r.delivery_seconds),
        text: r.delivery_seconds ? `p50 ${seconds(r.delivery_seconds.p50)} · p90 ${seconds(r.delivery_seconds.p90)} · p99 ${seconds(r.delivery_seconds.p99)}` : '–',
      }))));
  };

  preset.addEventListener('change', () => void refresh());
  for (const input of [from, to]) {
    input.addEventListener('change', () => {
      preset.value = 'custom';
      void refresh();
    });
  }
  for (const input of [groupBy, region, store, currency]) input.addEventListener('change', () => void refresh());

  const stop = every(5000, async () => {
    if (live.checked) await refresh();
  });
  const element = h('div', { class: 'analytics-page' },
    h('div', { class: 'toolbar' },
      preset, h('label', {}, 'from ', from), h('label', {}, 'to ', to), h('span', { class: 'muted' }, 'UTC'),
      groupBy, region, store, h('label', {}, 'currency ', currency),
      h('label', {}, live, ' live'), h('button', { type: 'button', onclick: () => void refresh() }, 'Refresh'), state),
    h('div', { class: 'card' }, h('h3', {}, 'In the range'), totals),
    charts,
    cancellations);
  return {
    element,
    stop: () => {
      stop();
      for (const chart of Object.values(timeCharts)) chart.destroy();
    },
  };
}
