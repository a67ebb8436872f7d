// The operations console in Debian's Chromium, driven as a person would through playwright-core,
// against a running backbone that tests/tests/console.rs starts and drives. Run by that test
// (`scripts/test --test console`), which passes the URL and tokens in the environment.
//
// The two sides take turns over this process's standard streams: this script prints
// `@ready <phase>` when the page is ready for the next thing to happen, and the Rust side makes
// it happen on the backbone (an order step, a poisoned read model, new orders) and answers
// `@done <phase> <json>`. Screenshots go to CONSOLE_SCREENSHOTS.

import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: this script is run by tests/tests/console.rs (scripts/test --test console)`);
  return value;
}

const CONSOLE_URL = required('CONSOLE_URL');
const CHROMIUM = required('CHROMIUM');
const SCREENSHOTS = required('CONSOLE_SCREENSHOTS');
const TOKENS = {
  admin: required('ADMIN_TOKEN'),
  analyst: required('ANALYST_TOKEN'),
  auditor: required('AUDITOR_TOKEN'),
  forged: required('FORGED_TOKEN'),
  store: required('STORE_TOKEN'),
};
const WAIT = 45_000;

// ---- turns with the Rust side ----
const answers = [];
const waiters = [];
createInterface({ input: process.stdin }).on('line', (line) => {
  const waiter = waiters.shift();
  if (waiter) waiter(line);
  else answers.push(line);
});

/** Asks the Rust side to do `name` on the backbone; resolves with its answer. */
async function phase(name) {
  process.stdout.write(`@ready ${name}\n`);
  const line = answers.length > 0 ? answers.shift() : await new Promise((resolve) => waiters.push(resolve));
  const prefix = `@done ${name}`;
  assert.ok(line.startsWith(prefix), `expected "${prefix}", got "${line}"`);
  return JSON.parse(line.slice(prefix.length).trim() || '{}');
}

// ---- the browser ----
let browser;
const problems = [];

before(async () => {
  await mkdir(SCREENSHOTS, { recursive: true });
  // Playwright gives each launch a fresh, empty user-data-dir of its own.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  process.stdin.destroy();
});

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1440, height: 1000 }, locale: 'en-GB', timezoneId: 'UTC' });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('pageerror', (error) => problems.push(`page error: ${error}`));
  page.on('console', (message) => {
    // The browser logs every refused request (401 for the forged token): those are expected.
    if (message.type() === 'error' && !message.text().startsWith('Failed to load resource')) {
      problems.push(`console error: ${message.text()}`);
    }
  });
  return page;
}

async function shot(page, name) {
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

async function signIn(page, token) {
  await page.goto(CONSOLE_URL);
  await page.locator('#token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

async function tabs(page) {
  await page.locator('nav.tabs').waitFor();
  return page.locator('nav.tabs button').evaluateAll((buttons) => buttons.map((b) => b.dataset.tab));
}

async function statusShown(page, status) {
  await page.waitForFunction(
    (want) => document.querySelector('[data-testid=order-status]')?.dataset.status === want,
    status,
    { timeout: WAIT },
  );
}

// ---- the story ----
test('the operations console in Chromium', async (t) => {
  const page = await newPage();

  await t.test('a token the API does not accept is refused, and the API’s reason is shown', async () => {
    await signIn(page, TOKENS.forged);
    const error = page.getByTestId('sign-in-error');
    await error.filter({ hasText: '401' }).waitFor();
    assert.match(await error.textContent(), /^401 Authentication required: the token's signature does not verify/);
    await shot(page, '01-forged-token-refused');
  });

  await t.test('an admin signs in and sees every tab', async () => {
    await signIn(page, TOKENS.admin);
    assert.equal(await page.getByTestId('role').textContent(), 'admin');
    assert.deepEqual(await tabs(page), ['orders', 'analytics', 'read-models', 'stuck-flows']);
  });

  let orderId;
  await t.test('an order found by id shows as Placed', async () => {
    ({ order_id: orderId } = await phase('order'));
    await page.locator('[data-tab=orders]').click();
    await page.getByTestId('find-order').fill(orderId);
    await page.getByTestId('find-order').press('Enter');
    await statusShown(page, 'Placed');
    await page.getByTestId('stream-state').filter({ hasText: 'live' }).waitFor();
    // Every status the page shows from now on, in order (each change, even two in one task).
    await page.evaluate(() => {
      const shown = () => document.querySelector('[data-testid=order-status]')?.dataset.status;
      window.seen = [shown()];
      new MutationObserver((records) => {
        const changes = records.filter((r) => r.target.matches('[data-testid=order-status]'));
        const values = [...changes.slice(1).map((r) => r.oldValue), shown()];
        for (const value of values) if (value && value !== window.seen.at(-1)) window.seen.push(value);
      }).observe(document.getElementById('app'), {
        attributes: true, subtree: true, attributeFilter: ['data-status'], attributeOldValue: true,
      });
    });
  });

  await t.test('its status changes on the page as the order moves, up to Completed', async () => {
    for (const [step, status] of [
      ['confirm', 'Confirmed'],
      ['accept', 'Accepted'],
      ['prepare', 'Preparing'],
      ['ready', 'Ready'],
      ['pickup', 'OutForDelivery'],
    ]) {
      await phase(step);
      await statusShown(page, status);
    }
    // The delivery panel: the courier's last fix and the ETA with its window, no map.
    await page.getByTestId('courier-position').filter({ hasText: '51.51000, -0.12000' }).waitFor();
    assert.match(await page.getByTestId('eta').textContent(), /between .+ and .+/);
    await shot(page, '02-order-out-for-delivery');
    await phase('deliver');
    await statusShown(page, 'Completed');
    const seen = await page.evaluate(() => window.seen);
    assert.deepEqual(seen, ['Placed', 'Confirmed', 'Accepted', 'Preparing', 'Ready', 'OutForDelivery', 'Delivered', 'Completed']);
    const timeline = await page.getByTestId('timeline').locator('li').count();
    assert.equal(timeline, 8, 'one timeline entry per status');
    // The list, refreshed every few seconds, agrees.
    await page.locator(`tr[data-order-id="${orderId}"] .status`).filter({ hasText: 'Completed' }).waitFor();
    await shot(page, '03-order-completed');
  });

  await t.test('a dead letter shows with its error; the admin re-drives it and it is gone', async () => {
    const { dead_letter_id: id } = await phase('poison');
    await page.locator('[data-tab=read-models]').click();
    const row = page.locator(`tr[data-letter-id="${id}"]`);
    await row.waitFor();
    assert.match(await row.textContent(), /notifications/);
    assert.match(await row.textContent(), /the notification store is down/);
    assert.match(await row.textContent(), /OrderConfirmed/);
    await shot(page, '04-dead-letter');
    await page.getByTestId(`redrive-${id}`).click();
    await row.waitFor({ state: 'detached' });
    await page.getByTestId('redrive-notes').filter({ hasText: `dead letter ${id} of notifications was re-driven and applied` }).waitFor();
    await page.getByTestId('dead-letters-notifications').filter({ hasText: /^0$/ }).waitFor();
    await shot(page, '05-dead-letter-redriven');
    await phase('redriven');
  });

  await t.test('a stuck flow shows with why; the admin retries it once the cause is fixed', async () => {
    const { stuck_flow_id: id } = await phase('stuck');
    await page.locator('[data-tab=stuck-flows]').click();
    const row = page.locator(`tr[data-flow-id="${id}"]`);
    await row.waitFor();
    assert.match(await row.textContent(), /request-delivery/);
    assert.match(await row.textContent(), /RequestDelivery/);
    assert.match(await row.textContent(), /km/);
    await shot(page, '06-stuck-flow');
    await page.getByTestId(`retry-${id}`).click();
    // Retried by the process manager, it no longer waits for an operator.
    await row.waitFor({ state: 'detached' });
    await phase('retried');
  });

  await t.test('the analytics chart changes after new orders', async () => {
    await page.locator('[data-tab=analytics]').click();
    const orders = page.getByTestId('orders-GBP');
    await orders.waitFor();
    const chart = page.getByTestId('chart-orders');
    await chart.locator('canvas').waitFor();
    const before = Number(await orders.textContent());
    const plotted = async () => JSON.parse((await chart.getAttribute('data-sums')) ?? '{}');
    assert.equal((await plotted()).placed, before, 'the chart plots the orders of the totals');
    const canvasBefore = await chart.locator('canvas').screenshot();
    const { placed } = await phase('more-orders');
    await page.waitForFunction(
      (want) => Number(document.querySelector('[data-testid=orders-GBP]')?.textContent) === want,
      before + placed,
      { timeout: WAIT },
    );
    await page.waitForFunction(
      (want) => JSON.parse(document.querySelector('[data-testid=chart-orders]')?.dataset.sums ?? '{}').placed === want,
      before + placed,
      { timeout: WAIT },
    );
    const canvasAfter = await chart.locator('canvas').screenshot();
    assert.ok(!canvasAfter.equals(canvasBefore), 'the chart was drawn again with the new orders');
    await shot(page, '07-analytics');
  });

  await t.test('an analyst and an auditor see what their role may see: no admin buttons', async () => {
    await phase('permanent-poison');
    // The admin is offered re-drives of the undecodable record…
    await page.locator('[data-tab=read-models]').click();
    await page.locator('tr[data-letter-id]').first().waitFor();
    assert.ok((await page.locator('button[data-testid^=redrive-]').count()) > 0);
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.locator('#token').waitFor();
    for (const role of ['analyst', 'auditor']) {
      const viewer = await newPage();
      await signIn(viewer, TOKENS[role]);
      assert.equal(await viewer.getByTestId('role').textContent(), role);
      assert.deepEqual(await tabs(viewer), ['orders', 'analytics', 'read-models'], `${role}: no stuck flows`);
      await viewer.locator('[data-tab=read-models]').click();
      // …the same dead letters, without a button.
      await viewer.locator('tr[data-letter-id]').first().waitFor();
      assert.equal(await viewer.getByRole('button', { name: /Re-drive/ }).count(), 0, `${role} sees no re-drive button`);
      await viewer.getByText('only an admin re-drives them').waitFor();
      await viewer.locator('[data-tab=analytics]').click();
      await viewer.getByTestId('orders-GBP').waitFor();
      await shot(viewer, `08-${role}`);
      await viewer.context().close();
    }
  });

  await t.test('another store’s order is refused with a 403, shown as the API said it', async () => {
    const store = await newPage();
    await signIn(store, TOKENS.store);
    assert.equal(await store.getByTestId('role').textContent(), 'store');
    assert.deepEqual(await tabs(store), ['orders'], 'a store lists its own orders, nothing else');
    await store.getByTestId('find-order').fill(orderId);
    await store.getByTestId('find-order').press('Enter');
    const banner = store.locator('#problem');
    await banner.filter({ hasText: '403' }).waitFor();
    assert.match(await banner.textContent(), /^403 · Your role may not do this a store may view an order only on their own resources/);
    await shot(store, '09-store-refused');
    await store.context().close();
  });

  assert.deepEqual(problems, [], 'no script errors and no Content-Security-Policy violations');
});
