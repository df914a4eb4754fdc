// The login page of the NoduleNet web viewer: the only script a browser gets without the server's token.
// The token is kept in this tab's sessionStorage and sent as "Authorization: Bearer" with every request (never in
// a URL: URLs end up in logs and histories). Once the server accepts it, the viewer's code (/app/..., behind the
// token like every API call) is fetched with it and run from blob: URLs. Any 401 later (the server's token was
// changed) forgets the token and shows this form again.
'use strict';
(() => {
  const KEY = 'nodulenet-token';
  const $ = (id) => document.getElementById(id);

  class Unauthorized extends Error {}

  function token() { return sessionStorage.getItem(KEY) || ''; }

  function showLogin(message) {
    sessionStorage.removeItem(KEY);
    if (window.NoduleNetViewer) window.NoduleNetViewer.stop();
    $('app').hidden = true;
    $('logout').hidden = true;
    $('server-line').textContent = '';
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('token').value = '';
    $('token').focus();
  }

  // fetch() with the token; a 401 sends the user back to the login form.
  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {}, { Authorization: 'Bearer ' + token() });
    const response = await fetch(path, Object.assign({}, options, { headers, cache: 'no-store' }));
    if (response.status === 401) {
      showLogin('The server did not accept the token. Log in again.');
      throw new Unauthorized('401');
    }
    return response;
  }

  async function runScript(path) {
    const response = await api(path);
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    const url = URL.createObjectURL(new Blob([await response.arrayBuffer()], { type: 'text/javascript' }));
    try {
      await new Promise((resolve, reject) => {
        const script = document.createElement('script');
        script.src = url;
        script.onload = resolve;
        script.onerror = () => reject(new Error(`cannot run ${path}`));
        document.head.appendChild(script);
      });
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  async function enter() {
    const response = await api('/v1/info');
    if (!response.ok) throw new Error(`the server answered HTTP ${response.status}`);
    const info = await response.json();
    if (!window.niivue) await runScript('/app/vendor/niivue/niivue.umd.js');
    if (!window.NoduleNetViewer) await runScript('/app/viewer.js');
    await window.NoduleNetViewer.start({ api, token, info, Unauthorized });  // wired before it is shown
    $('login').hidden = true;
    $('app').hidden = false;
    $('logout').hidden = false;
    const model = info.model ? `${info.model.name} on ${info.device}` : 'no workers: jobs are only stored';
    $('server-line').textContent = `server ${info.version}, ${model}`;
    if (info.disclaimer) $('notice').textContent = info.disclaimer;
  }

  function tryEnter() {
    enter().catch((err) => {
      if (err instanceof Unauthorized) return;  // the form is already shown with the reason
      showLogin(`Cannot open the viewer: ${err.message}`);
    });
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, $('token').value.trim());
      $('login-error').textContent = '';
      tryEnter();
    });
    $('logout').addEventListener('click', () => showLogin(''));
    if (token()) tryEnter(); else showLogin('');
  });
})();
