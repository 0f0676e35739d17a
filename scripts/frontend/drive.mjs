// Drives one chat in the Gradio frontend with headless Chromium (called by scripts/frontend_demo.sh).
//
// 1. uploads IMAGE with no text, as Gradio sends it: a user message of its own;
// 2. asks QUESTION about it in a second message;
// 3. waits for both streamed answers, then saves SCREENSHOT.
//
// Every step has a deadline; any failure (an error toast in the page, an answer that never comes, an
// exchange that the logging proxy recorded as failed) exits non-zero with the reason.
//
// Environment: GRADIO_URL, IMAGE, SCREENSHOT, EXCHANGES (the proxy's JSON-lines log),
// QUESTION (optional), STEP_TIMEOUT_MS (optional, per answer; default 90000).

import { readFileSync, existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const GRADIO_URL = env('GRADIO_URL');
const IMAGE = env('IMAGE');
const SCREENSHOT = env('SCREENSHOT');
const EXCHANGES = env('EXCHANGES');
const QUESTION = env('QUESTION', 'What is in this picture?');
const STEP_TIMEOUT_MS = Number(env('STEP_TIMEOUT_MS', '90000'));
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');

const log = (...args) => console.log('[drive]', ...args);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The chat-completion exchanges the proxy has finished recording (it writes one when a stream ends). */
function chatExchanges() {
  if (!existsSync(EXCHANGES)) return [];
  return readFileSync(EXCHANGES, 'utf8')
    .split('\n')
    .filter((line) => line.trim())
    .map((line) => JSON.parse(line))
    .filter((x) => x.method === 'POST' && x.path.endsWith('/chat/completions'));
}

/** Fails fast on Gradio's error toast (what load_chat shows when the OpenAI call raises). */
async function errorToast(page) {
  const toasts = page.locator('.toast-body.error, [data-testid="toast-body"].error');
  if ((await toasts.count()) === 0) return null;
  return (await toasts.first().innerText()).replace(/\s+/g, ' ').trim();
}

/** Waits until `count` answers are complete: recorded by the proxy and shown, unchanging, in the page. */
async function waitForAnswers(page, count) {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  const bots = page.locator('[data-testid="bot"]');
  let last = null;
  let stableSince = 0;
  while (Date.now() < deadline) {
    const toast = await errorToast(page);
    if (toast) throw new Error(`Gradio shows an error: ${toast}`);
    const exchanges = chatExchanges();
    const failed = exchanges.find((x) => x.status !== 200);
    if (failed) throw new Error(`the server answered ${failed.status}: ${JSON.stringify(failed.response)}`);
    const shown = await bots.count();
    if (exchanges.length >= count && shown >= count) {
      const text = await bots.nth(count - 1).innerText();
      const generating = await page.locator('[data-testid="stop-button"]:visible').count();
      if (text.trim() && text === last && !generating) {
        if (Date.now() - stableSince > 1000) return text;
      } else {
        last = text;
        stableSince = Date.now();
      }
    }
    await sleep(250);
  }
  throw new Error(
    `answer ${count} did not arrive within ${STEP_TIMEOUT_MS} ms ` +
      `(${chatExchanges().length} exchanges recorded, ${await bots.count()} answers shown)`,
  );
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
    '--disable-quic',
  ],
  timeout: 30000,
});
let exitCode = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 960 } });
  page.setDefaultTimeout(30000);
  page.on('pageerror', (err) => log('page error:', err.message));

  log(`opening ${GRADIO_URL}`);
  await page.goto(GRADIO_URL, { waitUntil: 'domcontentloaded' });
  const textbox = page.locator('textarea').first();
  await textbox.waitFor({ state: 'visible' });

  log(`uploading ${IMAGE} with no text`);
  await page.locator('input[type="file"]').first().setInputFiles(IMAGE);
  // The upload is done when the textbox shows its thumbnail.
  await page.locator('.thumbnail-item img, .thumbnails img').first().waitFor({ state: 'visible' });
  await page.locator('[data-testid="submit-button"]').click();
  await page.locator('[data-testid="user"] img').first().waitFor({ state: 'visible' });
  const first = await waitForAnswers(page, 1);
  log(`answer 1 (to the image alone): ${JSON.stringify(first)}`);

  log(`asking: ${QUESTION}`);
  await textbox.fill(QUESTION);
  await textbox.press('Enter');
  const second = await waitForAnswers(page, 2);
  log(`answer 2 (to the question): ${JSON.stringify(second)}`);

  const users = await page.locator('[data-testid="user"]').count();
  const images = await page.locator('[data-testid="user"] img').count();
  if (users !== 2 || images !== 1) throw new Error(`expected 2 user messages, 1 with the image; saw ${users}, ${images}`);

  await page.screenshot({ path: SCREENSHOT });
  log(`screenshot: ${SCREENSHOT}`);
} catch (err) {
  exitCode = 1;
  console.error('[drive] FAILED:', err.message);
} finally {
  await browser.close();
}
process.exit(exitCode);
