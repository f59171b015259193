// Offline copy of the page: every file of the build is cached on install (the list and version are
// filled in by build.mjs) and served from the cache first. Responses get the cross-origin isolation
// headers, so WebAssembly threads work even on a static host that cannot set headers.
const VERSION = '%VERSION%';
const ASSETS = %ASSETS%;
const CACHE = `scsonet-web-${VERSION}`;

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(ASSETS)).then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) if (key !== CACHE) await caches.delete(key);
    await self.clients.claim();
  })());
});

function isolated(response) {
  if (!response || response.status === 0 || response.type === 'opaque') return response;
  const headers = new Headers(response.headers);
  headers.set('Cross-Origin-Opener-Policy', 'same-origin');
  headers.set('Cross-Origin-Embedder-Policy', 'require-corp');
  headers.set('Cross-Origin-Resource-Policy', 'same-origin');
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
}

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET' || new URL(request.url).origin !== self.location.origin) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    const key = request.mode === 'navigate' ? new URL('./', self.location).href : request;
    const cached = await cache.match(key, { ignoreSearch: true });
    if (cached) return isolated(cached);
    return isolated(await fetch(request));
  })());
});
