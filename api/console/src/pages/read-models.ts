// Read models: each projector's lag (records and seconds, per partition, as it last measured)
// from `/projections`, and the dead letters waiting (`dead`, or `redrive_requested` until the
// projector applies them) with their error; admins re-drive them. A re-driven letter leaves
// the list once the projector applied it.

import type { ApiProblem } from '../api';
import { type Context, type Page, every } from '../context';
import { fill, h, relative, seconds, table, time } from '../dom';
import { allowed, may } from '../policy';

interface PartitionLag {
  topic: string;
  partition: number;
  next_offset: number;
  high_watermark: number;
  lag_events: number;
  lag_seconds: number;
  measured_at: string;
  owner: string;
}

interface ReadModelStatus {
  name: string;
  lag_events: number;
  lag_seconds: number;
  partitions: PartitionLag[];
  dead_letters: number;
  redrives_pending: number;
}

interface DeadLetter {
  id: number;
  topic: string;
  partition: number;
  offset: number;
  event_id: string | null;
  aggregate_type: string | null;
  aggregate_id: string | null;
  sequence: number | null;
  event_type: string | null;
  error: string;
  status: string;
  attempts: number;
  failed_at: string;
  redrive_requested_at: string | null;
}

export function readModelsPage({ api, claims, report }: Context): Page {
  const mayRedrive = allowed(claims.role, may.redriveDeadLetters);
  const models = h('div', { 'data-testid': 'read-models' });
  const letters = h('div', { 'data-testid': 'dead-letters' });
  const notes = h('ul', { class: 'notes', 'data-testid': 'redrive-notes' });
  const state = h('span', { class: 'muted' });
  const expanded = new Set<string>();
  /** Letters this page asked to re-drive, until they leave the list. */
  const requested = new Map<number, string>();

  const redrive = async (model: string, letter: DeadLetter | null): Promise<void> => {
    try {
      const path = letter
        ? `/projections/${encodeURIComponent(model)}/dead-letters/${letter.id}/redrive`
        : `/projections/${encodeURIComponent(model)}/dead-letters/redrive`;
      const accepted = await api.post<{ requested: number[] }>(path);
      for (const id of accepted.requested) requested.set(id, model);
      await refresh();
    } catch (e) {
      report(e as ApiProblem);
    }
  };

  const refresh = async (): Promise<void> => {
    try {
      const statuses = await api.get<ReadModelStatus[]>('/projections');
      fill(models, table(['read model', 'lag (records)', 'lag (seconds)', 'dead letters', 're-drives pending', 'partitions'],
        statuses.map((m) => [
          h('strong', {}, m.name),
          h('span', { 'data-testid': `lag-events-${m.name}` }, m.lag_events),
          seconds(m.lag_seconds),
          h('span', { 'data-testid': `dead-letters-${m.name}`, class: m.dead_letters > 0 ? 'warn' : '' }, m.dead_letters),
          m.redrives_pending,
          h('details', {
            open: expanded.has(m.name),
            ontoggle: (event: Event) => {
              const open = (event.currentTarget as HTMLDetailsElement).open;
              if (open) expanded.add(m.name);
              else expanded.delete(m.name);
            },
          }, h('summary', {}, `${m.partitions.length} partitions`),
          table(['topic', 'partition', 'next offset', 'end', 'lag (records)', 'lag (s)', 'owner', 'measured'],
            m.partitions.map((p) => [p.topic, p.partition, p.next_offset, p.high_watermark, p.lag_events,
              seconds(p.lag_seconds), h('span', { class: 'mono' }, p.owner), relative(p.measured_at)]), { class: 'compact' })),
        ]), { class: 'models' }));

      const waiting: { model: string; letter: DeadLetter }[] = [];
      for (const m of statuses.filter((s) => s.dead_letters > 0 || s.redrives_pending > 0)) {
        for (const status of ['dead', 'redrive_requested']) {
          const page = await api.get<{ items: DeadLetter[] }>(`/projections/${encodeURIComponent(m.name)}/dead-letters`, { status, limit: 100 });
          for (const letter of page.items) waiting.push({ model: m.name, letter });
        }
      }
      const still = new Set(waiting.map((w) => w.letter.id));
      for (const [id, model] of requested) {
        if (!still.has(id)) {
          notes.prepend(h('li', {}, `dead letter ${id} of ${model} was re-driven and applied (${new Date().toLocaleTimeString()})`));
          requested.delete(id);
        }
      }
      const byModel = new Set(waiting.map((w) => w.model));
      fill(letters,
        waiting.length === 0
          ? h('p', { class: 'muted', 'data-testid': 'no-dead-letters' }, 'No dead letters waiting.')
          : table(['read model', 'id', 'event', 'aggregate', 'record', 'error', 'attempts', 'failed', 'status', ''],
            waiting.map(({ model, letter }) => [
              model, letter.id,
              letter.event_type ?? '(undecodable)',
              h('span', { class: 'mono' }, `${letter.aggregate_type ?? '?'} ${letter.aggregate_id ?? ''}${letter.sequence ? ` #${letter.sequence}` : ''}`),
              `${letter.topic}[${letter.partition}]@${letter.offset}`,
              h('code', { class: 'error-text' }, letter.error),
              letter.attempts,
              time(letter.failed_at),
              letter.status === 'redrive_requested' ? 're-drive requested' : letter.status,
              mayRedrive && letter.status === 'dead'
                ? h('button', { type: 'button', 'data-testid': `redrive-${letter.id}`, onclick: () => void redrive(model, letter) }, 'Re-drive')
                : null,
            ]), { class: 'letters' }),
        mayRedrive && waiting.length > 1
          ? h('p', {}, ...[...byModel].map((model) =>
            h('button', { type: 'button', onclick: () => void redrive(model, null) }, `Re-drive all of ${model}`)))
          : null);
      for (const [index, row] of Array.from(letters.querySelectorAll('tbody tr')).entries()) {
        const entry = waiting[index];
        if (entry) row.setAttribute('data-letter-id', String(entry.letter.id));
      }
      state.textContent = `refreshed ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      state.textContent = 'not refreshed';
      report(e);
    }
  };

  const stop = every(2000, refresh);
  const element = h('div', { class: 'read-models-page' },
    h('div', { class: 'toolbar' }, h('span', { class: 'muted' }, 'Lag as each projector measured it (every second).'), h('span', { class: 'spacer' }), state),
    h('div', { class: 'card' }, h('h3', {}, 'Read models'), models),
    h('div', { class: 'card' }, h('h3', {}, 'Dead letters'),
      mayRedrive ? null : h('p', { class: 'muted' }, `A ${claims.role} sees dead letters; only an admin re-drives them.`),
      letters, notes));
  return { element, stop };
}
