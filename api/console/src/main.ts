// The operations console: sign in with a bearer token, then the tabs the token's role may see.
// Everything shown comes from the API (this page's origin) with that token.

import 'uplot/dist/uPlot.min.css';
import './style.css';

import { Api, ApiProblem } from './api';
import type { Context, Page } from './context';
import { fill, h, time } from './dom';
import { analyticsPage } from './pages/analytics';
import { ordersPage } from './pages/orders';
import { readModelsPage } from './pages/read-models';
import { stuckFlowsPage } from './pages/stuck-flows';
import { allowed, may } from './policy';
import { type Claims, type Role, readClaims, storeToken, storedToken } from './token';

interface Tab {
  id: string;
  label: string;
  who: readonly Role[];
  open: (context: Context) => Page;
}

const TABS: Tab[] = [
  { id: 'orders', label: 'Live orders', who: may.listOrders, open: ordersPage },
  { id: 'analytics', label: 'Analytics', who: may.viewAnalytics, open: analyticsPage },
  { id: 'read-models', label: 'Read models', who: may.viewOperations, open: readModelsPage },
  { id: 'stuck-flows', label: 'Stuck flows', who: may.viewStuckFlows, open: stuckFlowsPage },
];

const app = document.getElementById('app') as HTMLElement;
const who = document.getElementById('who') as HTMLElement;
const banner = document.getElementById('problem') as HTMLElement;
/** The API's root: the console is served at `<root>/console/`. */
const apiBase = new URL('..', window.location.href);

let current: Page | null = null;

function report(error: unknown): void {
  if (error === null) {
    banner.hidden = true;
    banner.replaceChildren();
    return;
  }
  const problem =
    error instanceof ApiProblem ? error : new ApiProblem(0, 'Error', error instanceof Error ? error.message : String(error));
  const what =
    problem.status === 401
      ? 'The API does not accept this token'
      : problem.status === 403
        ? 'Your role may not do this'
        : problem.title;
  fill(
    banner,
    h('strong', {}, problem.status ? `${problem.status} · ${what}` : what),
    h('span', { 'data-testid': 'problem-detail' }, ` ${problem.detail}`),
    h('button', { class: 'link', type: 'button', onclick: () => report(null) }, 'dismiss'),
  );
  banner.dataset.status = String(problem.status);
  banner.hidden = false;
}

function signOut(): void {
  current?.stop();
  current = null;
  storeToken(null);
  showSignIn();
}

function showSignIn(message?: string): void {
  fill(who);
  const input = h('textarea', {
    id: 'token',
    rows: 4,
    spellcheck: 'false',
    autocomplete: 'off',
    placeholder: 'eyJhbGciOiJIUzI1NiJ9…',
    'aria-label': 'Bearer token',
  });
  const error = h('p', { class: 'error', 'data-testid': 'sign-in-error', role: 'alert' }, message ?? '');
  const form = h(
    'form',
    { class: 'card sign-in' },
    h('h2', {}, 'Sign in'),
    h(
      'p',
      {},
      'Paste a bearer token of the API (the same tokens and roles: admin, analyst, auditor, …). ',
      'scripts/run-backbone prints an admin and an analyst token; more with ',
      h('code', {}, 'mint-token --role ROLE'),
      '.',
    ),
    input,
    error,
    h('button', { type: 'submit' }, 'Sign in'),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    void signIn(input.value.trim(), error);
  });
  fill(app, form);
  input.focus();
}

async function signIn(token: string, error: HTMLElement): Promise<void> {
  let claims: Claims;
  try {
    claims = readClaims(token);
  } catch (e) {
    error.textContent = e instanceof Error ? e.message : String(e);
    return;
  }
  const api = new Api(apiBase, token, (problem) => report(problem));
  try {
    // Every role may read the catalogue: a 401 here says the API refuses the token itself.
    await api.get('/catalogue');
  } catch (e) {
    error.textContent = e instanceof ApiProblem ? e.message : String(e);
    return;
  }
  report(null);
  storeToken(token);
  showConsole(api, claims);
}

function showConsole(api: Api, claims: Claims): void {
  const context: Context = { api, claims, report };
  fill(
    who,
    h('span', { class: 'role', 'data-testid': 'role' }, claims.role),
    h('span', { class: 'muted', title: 'the token’s subject (sub)' }, claims.sub),
    h('span', { class: 'muted' }, `until ${time(new Date(claims.exp * 1000).toISOString())}`),
    h('button', { type: 'button', class: 'link', onclick: signOut }, 'Sign out'),
  );
  const tabs = TABS.filter((tab) => allowed(claims.role, tab.who));
  if (tabs.length === 0) {
    fill(
      app,
      h(
        'p',
        { class: 'card' },
        `A ${claims.role} token sees nothing in the operations console: it is for staff roles (admin, analyst, auditor).`,
      ),
    );
    return;
  }
  const content = h('section', { class: 'content' });
  const buttons = tabs.map((tab) =>
    h(
      'button',
      {
        type: 'button',
        role: 'tab',
        'data-tab': tab.id,
        onclick: () => open(tab),
      },
      tab.label,
    ),
  );
  const open = (tab: Tab): void => {
    current?.stop();
    report(null);
    for (const button of buttons) button.setAttribute('aria-selected', String(button.dataset.tab === tab.id));
    current = tab.open(context);
    fill(content, current.element);
    history.replaceState(null, '', `#${tab.id}`);
  };
  fill(app, h('nav', { class: 'tabs', role: 'tablist' }, ...buttons), content);
  const wanted = tabs.find((tab) => `#${tab.id}` === window.location.hash) ?? tabs[0];
  if (wanted) open(wanted);
}

const saved = storedToken();
if (saved) {
  try {
    showConsole(new Api(apiBase, saved, (problem) => report(problem)), readClaims(saved));
  } catch {
    storeToken(null);
    showSignIn();
  }
} else {
  showSignIn();
}
