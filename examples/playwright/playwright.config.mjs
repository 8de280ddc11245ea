import { defineConfig } from '@playwright/test';

export default defineConfig({
  testDir: '.',
  testMatch: '*.spec.mjs',
  // Starts wsgate (and the backend it fronts) once for the run; see global-setup.mjs.
  globalSetup: './global-setup.mjs',
  workers: 1,
  reporter: 'list',
  timeout: 30_000,
  use: { headless: true },
});
