// The NoduleNet web viewer (run by login.js once the server accepted the token; every request carries it).
//
// Jobs: upload a scan (POST /v1/jobs, with upload progress), follow it (GET /v1/jobs/{id} once a second), list the
// jobs, open a finished one. Opening fetches the scan as NIfTI (/volume), the label map (/mask, value = finding id)
// and nodules.json, and shows them with NiiVue (vendor/niivue, BSD-2-Clause): axial, coronal, sagittal and a 3D
// render, radiological convention (the patient's right on the screen's left, as the desktop viewer), the findings as
// a coloured overlay (fill and outline, one colour per finding), a marker with "#id score" per finding in the 3D
// render, a table that moves the crosshair to a finding when clicked, and a score slider that hides the findings
// below it (table, overlay and markers). Downloads go through fetch() with the token, then a blob: link.
//
// World coordinates: nodules.json is DICOM LPS (x, y, z) mm; NiiVue works in NIfTI RAS mm: (-x, -y, z).
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  // Finding colours (RGB 0-255): saturated, far in hue from each other and from the crosshair (blue) and the grey
  // scan, so a pixel's colour names its finding (the browser test relies on this).
  const PALETTE = [[255, 215, 0], [255, 0, 255], [0, 230, 0], [255, 100, 0], [170, 60, 255], [255, 0, 90]];
  const WINDOWS = { lung: [-1350, 150], mediastinum: [-125, 225] };  // W 1500 L -600; W 350 L 50 (HU)
  const FILL_OPACITY = 0.65;  // of the label layer: the scan shows through the fill
  const DOWNLOADS = [['report_html', 'Report'], ['nodules_json', 'nodules.json'], ['label_map', 'Label map'],
    ['dicom_seg', 'DICOM SEG'], ['dicom_sr', 'DICOM SR'], ['candidates_csv', 'Candidates CSV']];

  let ctx = null;            // {api, token, info, Unauthorized} from login.js
  let nv = null;             // the Niivue instance
  let timers = [];
  let current = null;        // {job, findings, scan, labels, threshold, selected}
  let generation = 0;        // bumps on every job opened, so a slow load of an older one is dropped

  const colour = (id) => PALETTE[(id - 1) % PALETTE.length];
  const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  const fmt = (v, d = 1) => (v === null || v === undefined ? 'n/a' : Number(v).toFixed(d));

  function setMessage(text) {
    $('viewer-message').textContent = text || '';
    $('viewer-message').hidden = !text;
  }

  async function json(path) {
    const r = await ctx.api(path);
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.detail || `${path}: HTTP ${r.status}`);
    return body;
  }

  // GET path as bytes, reporting "what: n MB" while it arrives.
  async function bytes(path, what) {
    const r = await ctx.api(path);
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.detail || `${path}: HTTP ${r.status}`);
    }
    const total = Number(r.headers.get('content-length')) || 0;
    const reader = r.body.getReader();
    const chunks = [];
    let got = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      got += value.length;
      setMessage(`Loading ${what}: ${(got / 1e6).toFixed(1)}${total ? ' / ' + (total / 1e6).toFixed(1) : ''} MB`);
    }
    const out = new Uint8Array(got);
    let at = 0;
    for (const c of chunks) { out.set(c, at); at += c.length; }
    return out.buffer;
  }

  // ------------------------------------------------------------------------------------------------ NiiVue

  async function ensureNiivue() {
    if (nv) return nv;
    const N = window.niivue;
    nv = new N.Niivue({
      backColor: [0, 0, 0, 1], crosshairColor: [0.2, 0.45, 1.0, 1.0], crosshairWidth: 1, crosshairGap: 14,
      isRadiologicalConvention: true, multiplanarShowRender: N.SHOW_RENDER.ALWAYS, multiplanarLayout: 2,
      isColorbar: false, show3Dcrosshair: true, dragAndDropEnabled: false, logLevel: 'warn', loadingText: '',
      isOrientationTextVisible: true, showLegend: true, isNearestInterpolation: false,
    });
    await nv.attachToCanvas($('gl'));
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.onLocationChange = (data) => { $('location').textContent = data && data.string ? data.string : ''; };
    return nv;
  }

  // The label LUT: finding k in its colour; alpha 255 (fill, made translucent by the layer's opacity) or 0
  // (outline only: NiiVue still draws the border of a NIFTI_INTENT_LABEL volume at full strength).
  function labelLut(findings) {
    const maxId = Math.max(0, ...findings.map((f) => f.id));
    const R = [], G = [], B = [], A = [], I = [], labels = [];
    for (let id = 0; id <= maxId; id++) {
      const c = id === 0 ? [0, 0, 0] : colour(id);
      R.push(c[0]); G.push(c[1]); B.push(c[2]);
      A.push(id === 0 || !$('show-fill').checked ? 0 : 255);
      I.push(id);
      labels.push(id === 0 ? '' : `#${id}`);
    }
    return { R, G, B, A, I, labels };
  }

  // Findings below the slider leave the label map itself (a LUT alpha of 0 would still leave their outline).
  function maskedLabels(threshold) {
    const { findings, labelValues } = current;
    const keep = new Uint8Array(Math.max(0, ...findings.map((f) => f.id)) + 1);
    for (const f of findings) keep[f.id] = f.score >= threshold ? 1 : 0;
    const out = current.labels.img;
    for (let i = 0; i < labelValues.length; i++) {
      const v = labelValues[i];
      out[i] = v && keep[v] ? v : 0;
    }
  }

  // The label layer as the controls say (findings above the slider, fill, outline); NiiVue takes it in at the next
  // updateGLVolume (or addVolume), which re-renders every layer: one such pass per change, never two.
  function prepareLabels() {
    maskedLabels(current.threshold);
    current.labels.setColormapLabel(labelLut(current.findings));
    current.labels.opacity = FILL_OPACITY;
    nv.opts.atlasOutline = $('show-outline').checked ? 1 : 0;
  }

  // Markers: "#id score" at each shown finding's centre, in the 3D render (NiiVue draws them there only when a
  // render is on screen; a single 2D view gets no markers, its outlines are the marks).
  function placeMarkers() {
    nv.document.labels = [];
    const view = document.querySelector('[data-view].active').dataset.view;
    if (!current || (view !== 'multi' && view !== 'render')) return;
    for (const f of current.findings) {
      if (f.score < current.threshold) continue;
      const c = [...colour(f.id).map((v) => v / 255), 1];
      const style = new window.niivue.NVLabel3DStyle(c, 1.0, undefined, 1, c, undefined, 1.0, c, [0, 0, 0, 0.5]);
      nv.addLabel(`#${f.id} ${f.score.toFixed(2)}`, style, ras(f.center_world_xyz_mm));
    }
  }

  function applyOverlay() {
    if (!nv || !current) return;
    placeMarkers();
    if (!current.labels) { nv.drawScene(); return; }
    prepareLabels();
    nv.updateGLVolume();
  }

  const ras = (lps) => [-lps[0], -lps[1], lps[2]];

  function setWindow(name) {
    document.querySelectorAll('[data-window]').forEach((b) => b.classList.toggle('active', b.dataset.window === name));
    if (!current || !current.scan) return;
    [current.scan.cal_min, current.scan.cal_max] = WINDOWS[name];
    nv.updateGLVolume();
  }

  function setView(name) {
    document.querySelectorAll('[data-view]').forEach((b) => b.classList.toggle('active', b.dataset.view === name));
    if (!nv) return;
    const types = { multi: nv.sliceTypeMultiplanar, axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal,
      sagittal: nv.sliceTypeSagittal, render: nv.sliceTypeRender };
    nv.setSliceType(types[name]);
    placeMarkers();
    nv.drawScene();
  }

  function jumpTo(finding) {
    current.selected = finding.id;
    nv.scene.crosshairPos = nv.mm2frac(ras(finding.center_world_xyz_mm));
    nv.drawScene();
    nv.createOnLocationChange();
    document.querySelectorAll('#nodule-table tbody tr').forEach(
      (tr) => tr.classList.toggle('selected', Number(tr.dataset.id) === finding.id));
  }

  // ------------------------------------------------------------------------------------------------ tables

  function renderNodules() {
    const body = $('nodule-table').querySelector('tbody');
    body.textContent = '';
    const shown = current.findings.filter((f) => f.score >= current.threshold);
    for (const f of shown) {
      const tr = document.createElement('tr');
      tr.dataset.id = String(f.id);
      if (f.id === current.selected) tr.classList.add('selected');
      const cells = ['', `${f.id}`, fmt(f.score, 2), fmt(f.diameter_mm), fmt(f.volume_mm3, 0),
        f.center_world_xyz_mm.map((v) => fmt(v)).join(', ')];
      cells.forEach((text, i) => {
        const td = document.createElement('td');
        if (i === 0) {
          const sw = document.createElement('span');
          sw.className = 'swatch';
          sw.style.background = rgb(colour(f.id));
          td.appendChild(sw);
        } else td.textContent = text;
        tr.appendChild(td);
      });
      tr.addEventListener('click', () => jumpTo(f));
      body.appendChild(tr);
    }
    $('nodules-empty').hidden = shown.length > 0;
  }

  function renderDownloads(job) {
    const list = $('downloads');
    list.textContent = '';
    for (const [kind, title] of DOWNLOADS) {
      const file = (job.files || []).find((f) => f.kind === kind);
      if (!file) continue;
      const li = document.createElement('li');
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = title;
      button.title = `${file.name} (${(file.bytes / 1e6).toFixed(2)} MB)`;
      button.dataset.file = file.name;
      button.addEventListener('click', () => download(job.id, file.name).catch((e) => alert(e.message)));
      li.appendChild(button);
      list.appendChild(li);
    }
  }

  async function download(jobId, name) {
    const r = await ctx.api(`/v1/jobs/${jobId}/files/${encodeURIComponent(name)}`);
    if (!r.ok) throw new Error(`${name}: HTTP ${r.status}`);
    const url = URL.createObjectURL(await r.blob());
    const a = document.createElement('a');
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  async function refreshJobs() {
    const page = await json('/v1/jobs?limit=100');
    const body = $('jobs-table').querySelector('tbody');
    body.textContent = '';
    for (const job of page.jobs) {
      const tr = document.createElement('tr');
      tr.dataset.id = job.id;
      tr.dataset.state = job.state;
      if (current && current.job && current.job.id === job.id) tr.classList.add('selected');
      const state = job.state === 'running' ? `running ${Math.round(job.progress * 100)}%` : job.state;
      const cells = [job.input.name, state, job.state === 'done' ? String(job.n_findings) : '',
        job.created.slice(0, 19).replace('T', ' ')];
      cells.forEach((text, i) => {
        const td = document.createElement('td');
        td.textContent = text;
        if (i === 1) { td.className = `state-${job.state}`; if (job.error) td.title = job.error; }
        tr.appendChild(td);
      });
      tr.addEventListener('click', () => {
        if (job.state === 'done') openJob(job.id).catch(showError);
        else if (job.state === 'failed') alert(`Job failed: ${job.error}`);
        else follow(job.id);
      });
      body.appendChild(tr);
    }
    $('jobs-empty').hidden = page.jobs.length > 0;
    return page;
  }

  function showError(err) {
    if (err instanceof ctx.Unauthorized) return;
    setMessage(`Error: ${err.message}`);
  }

  // ------------------------------------------------------------------------------------------------ jobs

  function uploadStatus(progress, text) {
    $('upload-status').hidden = false;
    $('upload-progress').value = progress;
    $('upload-stage').textContent = text;
  }

  function upload(files, threshold) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open('POST', '/v1/jobs');
      xhr.setRequestHeader('Authorization', 'Bearer ' + ctx.token());
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) uploadStatus(e.loaded / e.total, `uploading ${(e.loaded / 1e6).toFixed(1)} MB`);
      };
      xhr.onload = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
        if (xhr.status === 401) { ctx.api('/v1/info').catch(() => {}); reject(new ctx.Unauthorized('401')); }
        else if (xhr.status === 201) resolve(body);
        else reject(new Error(body.detail || `upload refused (HTTP ${xhr.status})`));
      };
      xhr.onerror = () => reject(new Error('the upload did not reach the server'));
      const form = new FormData();
      for (const f of files) form.append('file', f, f.name);
      if (threshold !== '') form.append('threshold', threshold);
      xhr.send(form);
    });
  }

  // Poll one job until it is done (then open it) or failed.
  function follow(jobId) {
    const tick = async () => {
      let job;
      try { job = await json(`/v1/jobs/${jobId}`); } catch (e) { showError(e); return; }
      if (job.state === 'queued') {
        uploadStatus(0, `queued${job.queue_position ? ' (position ' + job.queue_position + ')' : ''}`);
      } else if (job.state === 'running') {
        uploadStatus(job.progress, `${job.stage || 'running'} (${Math.round(job.progress * 100)}%)`);
      }
      if (job.state === 'done' || job.state === 'failed') {
        uploadStatus(1, job.state === 'done' ? `done: ${job.n_findings} finding(s) in ${fmt(job.seconds)} s`
          : `failed: ${job.error}`);
        await refreshJobs().catch(showError);
        if (job.state === 'done') await openJob(jobId).catch(showError);
        return;
      }
      timers.push(setTimeout(tick, 1000));
    };
    tick();
  }

  async function openJob(jobId) {
    const mine = ++generation;
    const job = await json(`/v1/jobs/${jobId}`);
    if (job.state !== 'done') { follow(jobId); return; }
    document.querySelectorAll('#jobs-table tbody tr').forEach((tr) => tr.classList.toggle('selected', tr.dataset.id === jobId));
    $('job-card').hidden = false;
    $('job-title').textContent = job.input.name;
    const threshold = Number(job.options.threshold ?? ctx.info.default_threshold ?? 0.5);
    const labelFile = job.files.find((f) => f.kind === 'label_map');
    setMessage('Loading...');
    const tOpen = performance.now();
    const nodules = await json(`/v1/jobs/${jobId}/nodules`);
    const findings = nodules.findings.slice().sort((a, b) => b.score - a.score);
    // no findings: no overlay to show (an all-zero label map would only cost a download)
    const [scanBytes, labelBytes] = await Promise.all([bytes(`/v1/jobs/${jobId}/volume`, 'the scan'),
      findings.length && labelFile ? bytes(`/v1/jobs/${jobId}/mask`, 'the label map') : null]);
    if (mine !== generation) return;  // another job was opened meanwhile
    await ensureNiivue();
    const N = window.niivue;
    const t0 = performance.now();  // downloads done
    const scan = await N.NVImage.loadFromUrl({ url: 'scan.nii.gz', name: 'scan.nii.gz', buffer: scanBytes,
      colormap: 'gray', cal_min: WINDOWS.lung[0], cal_max: WINDOWS.lung[1], trustCalMinMax: false });
    let labels = null;
    if (labelBytes) {
      labels = await N.NVImage.loadFromUrl({ url: labelFile.name, name: labelFile.name, buffer: labelBytes,
        opacity: FILL_OPACITY });
      // NIFTI_INTENT_LABEL: NiiVue then draws the values as labels, with the LUT's alpha and outlines
      labels.hdr.intent_code = 1002;
    }
    if (mine !== generation) return;
    const t1 = performance.now();  // decoded
    current = { job, findings, scan, labels, labelValues: labels ? labels.img.slice() : null, threshold,
      selected: null, loadMs: 0, timings: {} };
    [scan.cal_min, scan.cal_max] = WINDOWS[document.querySelector('[data-window].active').dataset.window];
    if (labels) prepareLabels();
    while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
    nv.addVolume(scan);
    if (labels) nv.addVolume(labels);  // (each addVolume renders every layer: the label layer once, ready)
    placeMarkers();
    const slider = $('score-slider');
    slider.min = String(threshold);
    slider.value = String(threshold);
    $('score-value').textContent = threshold.toFixed(2);
    renderNodules();
    renderDownloads(job);
    if (findings.length) jumpTo(findings[0]);
    const t2 = performance.now();
    current.loadMs = t2 - t0;
    current.timings = { download_ms: t0 - tOpen, decode_ms: t1 - t0, display_ms: t2 - t1 };
    setMessage('');
  }

  // ------------------------------------------------------------------------------------------------ wiring

  let wired = false;
  function wire() {
    if (wired) return;
    wired = true;
    $('upload-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const files = [...$('scan-file').files];
      if (!files.length) return;
      $('upload-button').disabled = true;
      try {
        uploadStatus(0, 'uploading');
        const job = await upload(files, $('upload-threshold').value);
        await refreshJobs();
        follow(job.id);
      } catch (err) {
        if (!(err instanceof ctx.Unauthorized)) uploadStatus(0, `refused: ${err.message}`);
      } finally {
        $('upload-button').disabled = false;
      }
    });
    $('refresh-jobs').addEventListener('click', () => refreshJobs().catch(showError));
    document.querySelectorAll('[data-window]').forEach((b) => b.addEventListener('click', () => setWindow(b.dataset.window)));
    document.querySelectorAll('[data-view]').forEach((b) => b.addEventListener('click', () => setView(b.dataset.view)));
    $('score-slider').addEventListener('input', () => {
      if (!current) return;
      current.threshold = Number($('score-slider').value);
      $('score-value').textContent = current.threshold.toFixed(2);
      applyOverlay();
      renderNodules();
    });
    $('show-fill').addEventListener('change', applyOverlay);
    $('show-outline').addEventListener('change', applyOverlay);
  }

  window.NoduleNetViewer = {
    async start(context) {
      ctx = context;
      wire();
      $('upload-threshold').value = String(ctx.info.default_threshold ?? '');
      await refreshJobs();
      document.body.dataset.viewer = 'ready';  // for scripts and tests: the viewer is wired and has the job list
      // keep the list fresh while something runs
      timers.push(setInterval(() => {
        if (document.querySelector('#jobs-table tr[data-state=queued], #jobs-table tr[data-state=running]')) {
          refreshJobs().catch(showError);
        }
      }, 3000));
    },
    stop() {
      delete document.body.dataset.viewer;
      timers.forEach((t) => { clearTimeout(t); clearInterval(t); });
      timers = [];
      generation++;
      current = null;
      if (nv) while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
      ['jobs-table', 'nodule-table'].forEach((id) => { $(id).querySelector('tbody').textContent = ''; });
      $('downloads').textContent = '';
      $('job-card').hidden = true;
      setMessage('Open a finished job to see its scan.');
    },
    niivue: () => nv,  // the Niivue instance, for scripts (nv.volumes[0]: the scan, [1]: the label map)
    // What the page shows, for scripts and the browser test: where each view is on the canvas (CSS pixels), the
    // crosshair (RAS mm), the open job and its findings, and how long NiiVue took to take in the volumes.
    state() {
      if (!nv || !current) return { loaded: false };
      const dpr = nv.uiData && nv.uiData.dpr ? nv.uiData.dpr : (window.devicePixelRatio || 1);
      const names = { 0: 'axial', 1: 'coronal', 2: 'sagittal', 4: 'render' };  // NiiVue's SLICE_TYPE
      return {
        loaded: true, job: current.job.id, selected: current.selected, threshold: current.threshold,
        load_ms: current.loadMs, timings: current.timings, crosshair_mm: Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3),
        tiles: nv.screenSlices.map((s) => ({ view: names[s.axCorSag] || String(s.axCorSag),
          ltwh: s.leftTopWidthHeight.map((v) => v / dpr), left_top_mm: s.leftTopMM, fov_mm: s.fovMM })),
        colours: Object.fromEntries(current.findings.map((f) => [f.id, colour(f.id)])),
      };
    },
  };
})();
