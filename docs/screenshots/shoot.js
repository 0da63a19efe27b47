// node shoot.js URL OUT.png [width height] [clickSelectorsJSON]
const puppeteer = require('puppeteer-core');
(async () => {
  const [url, out, w = '1900', h = '1100'] = process.argv.slice(2);
  const browser = await puppeteer.launch({executablePath: '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu']});
  const page = await browser.newPage();
  await page.setViewport({width: +w, height: +h});
  await page.goto(url, {waitUntil: 'networkidle0', timeout: 120000});
  await new Promise(r => setTimeout(r, 4000));
  // Close MLflow's assistant side panel if it is open (it takes a third of the width).
  const closed = await page.evaluate(() => {
    const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
    if (b) { b.click(); return true; } return false; });
  if (closed) await new Promise(r => setTimeout(r, 1500));
  if (process.env.TYPE) {
    await page.type('input[placeholder*="Search metric charts"]', process.env.TYPE);
    await new Promise(r => setTimeout(r, 3000));
  }
  if (process.env.EXPAND) { // expand nested runs
    await page.evaluate(() => document.querySelectorAll('button[aria-label*="xpand"], [data-testid*="expand"]').forEach(b => b.click()));
    await new Promise(r => setTimeout(r, 2000));
  }
  await page.waitForNetworkIdle({idleTime: 1500, timeout: 60000}).catch(() => {});
  await new Promise(r => setTimeout(r, 3000));
  await page.screenshot({path: out});
  console.log('closed assistant:', closed);
  await browser.close();
})();
