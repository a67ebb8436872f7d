import type { Api } from './api';
import type { Claims } from './token';

/** What every page gets. */
export interface Context {
  api: Api;
  claims: Claims;
  /** Shows an error in the page's banner (an ApiProblem as the API said it). */
  report: (error: unknown) => void;
}

/** A tab's content; `stop` ends its timers and streams when another tab opens. */
export interface Page {
  element: HTMLElement;
  stop: () => void;
}

/** Runs `task` now and every `ms` until stopped; a run never overlaps the previous one. */
export function every(ms: number, task: () => Promise<void>): () => void {
  let stopped = false;
  let timer: number | undefined;
  const run = async (): Promise<void> => {
    try {
      await task();
    } finally {
      if (!stopped) timer = window.setTimeout(() => void run(), ms);
    }
  };
  void run();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}
