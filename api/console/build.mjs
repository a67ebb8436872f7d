// Builds the console into dist/ (or the directory given as the first argument): the page, one
// bundled script and one style sheet (the console's own and uPlot's), no other file, nothing
// loaded from elsewhere at run time. The API serves the directory at /console/
// (API_CONSOLE_DIR). Type checking is `tsc --noEmit` (npm run build runs both).
import { build } from 'esbuild';
import { cp, mkdir, rename, rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, 'dist'));
// Built beside the target and swapped in, so a running API never serves half a build.
const staging = `${out}.staging`;
await rm(staging, { recursive: true, force: true });
await mkdir(staging, { recursive: true });
await build({
  entryPoints: { console: join(here, 'src/main.ts') },
  bundle: true,
  format: 'esm',
  target: ['es2022'],
  minify: true,
  sourcemap: 'linked',
  legalComments: 'linked',
  outdir: staging,
  logLevel: 'warning',
});
await cp(join(here, 'index.html'), join(staging, 'index.html'));
await rm(out, { recursive: true, force: true });
await rename(staging, out);
console.log(`console built into ${out}`);
