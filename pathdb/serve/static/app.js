/* pathdb explorer: a small single-page app over the JSON API of `pathdb serve`, or, in a file
 * written by `pathdb export RUN -o circuit.html`, over the data embedded in window.PATHDB_EXPORT.
 * Routes: #/ (runs), #/run/NAME/circuit|tree|prompts|faithfulness, #/compare/A/B. Plots: plotly.js. */
(function () {
  'use strict';

  const EXPORT = window.PATHDB_EXPORT || null;
  const POS = '#1f5fbf';
  const NEG = '#c62828';
  const KIND_COLOUR = { embed: '#9e9e9e', attn: '#ffb74d', mlp: '#81c784', final: '#9575cd' };
  const REFRESH_MS = 5000;
  const state = { run: null, view: 'circuit', sign: 'both', positional: false, prune: true, k: (EXPORT && EXPORT.k) || 30, cache: {}, timer: null, info: null };

  // ---- helpers ------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key === 'className') node.className = value;
      else node.setAttribute(key, value === true ? '' : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined) return '';
    if (typeof v !== 'number') return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e15) return v.toLocaleString('en-US');
    return Number(v.toPrecision(digits || 4)).toString();
  }

  function showError(message) {
    const box = document.getElementById('error');
    box.textContent = message || '';
    box.hidden = !message;
  }

  async function api(path) {
    const response = await fetch(path, { cache: 'no-store' });
    let body;
    try {
      body = await response.json();
    } catch (e) {
      throw new Error(`${path}: HTTP ${response.status}`);
    }
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  function runUrl(run, what, params) {
    const query = new URLSearchParams(params || {}).toString();
    return `api/runs/${encodeURIComponent(run)}/${what}${query ? '?' + query : ''}`;
  }

  function stopTimer() {
    if (state.timer) clearTimeout(state.timer);
    state.timer = null;
  }

  function table(columns, rows, rowAttrs) {
    const head = el('tr', {}, columns.map((c) => el('th', {}, c.title || c.key)));
    const body = rows.map((r, i) => el('tr', rowAttrs ? rowAttrs(r, i) : {},
      columns.map((c) => {
        const v = c.value ? c.value(r) : r[c.key];
        return el('td', { className: typeof v === 'number' ? 'num' : (c.className || null) }, v instanceof Node ? v : fmt(v));
      })));
    return el('table', {}, el('thead', {}, head), el('tbody', {}, body));
  }

  // ---- routing ------------------------------------------------------------------------------
  function route() {
    stopTimer();
    showError('');
    if (EXPORT) {
      state.run = EXPORT.run.name;
      state.info = EXPORT.run;
      setNav(state.run, 'circuit');
      return showCircuit();
    }
    const parts = location.hash.replace(/^#\/?/, '').split('/');
    if (parts[0] === 'compare' && parts[1] && parts[2]) {
      setNav(null);
      return showCompare(decodeURIComponent(parts[1]), decodeURIComponent(parts[2]));
    }
    if (parts[0] === 'run' && parts[1]) {
      const run = decodeURIComponent(parts[1]);
      if (run !== state.run) {
        state.run = run;
        state.cache = {};
        state.info = null;
      }
      const view = parts[2] || 'circuit';
      setNav(run, view);
      const views = { circuit: showCircuit, tree: showTree, prompts: showPrompts, faithfulness: showFaithfulness };
      return (views[view] || showCircuit)();
    }
    setNav(null);
    return showRuns();
  }

  function setNav(run, view) {
    const nav = document.getElementById('run-nav');
    nav.hidden = !run;
    if (!run) return;
    document.getElementById('run-title').textContent = `run ${run}`;
    for (const a of nav.querySelectorAll('a[data-view]')) {
      a.classList.toggle('active', a.dataset.view === view);
      if (EXPORT) a.hidden = a.dataset.view !== 'circuit';
      else a.href = `#/run/${encodeURIComponent(run)}/${a.dataset.view}`;
    }
  }

  // ---- runs ---------------------------------------------------------------------------------
  const RUN_COLUMNS = ['run_id', 'name', 'status', 'stop_reason', 'model_name', 'method', 'strategy', 'metric',
    'prompt_mode', 'n_evaluated', 'n_complete', 'n_kept', 'n_pruned', 'wall_s', 'cpr', 'cmd', 'edges_80'];

  async function showRuns() {
    const main = document.getElementById('main');
    let body;
    try {
      body = await api('api/runs');
    } catch (e) {
      showError(e.message);
      return;
    }
    document.getElementById('store').textContent = body.db;
    const running = body.runs.some((r) => r.status === 'running');
    const columns = RUN_COLUMNS.filter((c) => body.runs.some((r) => r[c] !== null && r[c] !== undefined))
      .map((key) => key === 'name'
        ? { key, value: (r) => el('a', { href: `#/run/${encodeURIComponent(r.name)}/circuit`, className: 'run-link' }, r.name) }
        : { key });
    main.replaceChildren(
      el('div', { className: 'controls' },
        el('strong', {}, `${body.runs.length} run${body.runs.length === 1 ? '' : 's'}`),
        el('button', { id: 'refresh-runs', onclick: () => route() }, 'refresh'),
        running ? el('span', { className: 'muted' }, 'a search is running: this page refreshes every 5 s') : null,
        body.runs.length > 1 ? comparePicker(body.runs) : null),
      body.runs.length
        ? table(columns, body.runs, (r) => ({ className: 'run-row', 'data-run': r.name }))
        : el('p', { className: 'muted' }, 'no runs in this store yet: run `pathdb search` and refresh'));
    main.querySelector('table')?.setAttribute('id', 'runs-table');
    if (running) state.timer = setTimeout(route, REFRESH_MS);
  }

  /** Two run menus and a button opening #/compare/A/B. */
  function comparePicker(runs) {
    const menu = (id, chosen) => el('select', { id }, runs.map((r) => el('option', { value: r.name, selected: r.name === chosen }, r.name)));
    return el('span', { id: 'compare-picker' }, 'compare ', menu('compare-a', runs[0].name), ' with ', menu('compare-b', runs[1].name), ' ',
      el('button', { id: 'compare-go', onclick: () => {
        const a = document.getElementById('compare-a').value;
        const b = document.getElementById('compare-b').value;
        location.hash = `#/compare/${encodeURIComponent(a)}/${encodeURIComponent(b)}`;
      } }, 'side by side'));
  }

  // ---- circuit ------------------------------------------------------------------------------
  async function edgeData(sign, positional, run) {
    const name = run || state.run;
    const key = `edges/${name}/${sign}/${positional}`;
    if (!state.cache[key]) {
      state.cache[key] = EXPORT
        ? Promise.resolve(EXPORT.views[sign])
        : api(runUrl(name, 'edges', { sign, positional: positional ? 1 : 0 }));
    }
    try {
      return await state.cache[key];
    } catch (e) {
      delete state.cache[key];
      throw e;
    }
  }

  /** The top k edges, pruned as pathdb.query.aggregate.prune_edges: keep an edge when its source
   *  is reachable from an input and its destination reaches the logits through selected edges. */
  function selectEdges(data, k, prune) {
    const sel = data.edges.slice(0, k);
    if (!prune || !sel.length) return sel;
    const reach = (starts, adjacency) => {
      const seen = new Set(starts);
      const stack = [...starts];
      while (stack.length) {
        for (const next of adjacency.get(stack.pop()) || []) {
          if (!seen.has(next)) { seen.add(next); stack.push(next); }
        }
      }
      return seen;
    };
    const fwdAdj = new Map();
    const bwdAdj = new Map();
    for (const e of sel) {
      if (!fwdAdj.has(e.src)) fwdAdj.set(e.src, []);
      if (!bwdAdj.has(e.dst)) bwdAdj.set(e.dst, []);
      fwdAdj.get(e.src).push(e.dst);
      bwdAdj.get(e.dst).push(e.src);
    }
    const fwd = reach(sel.filter((e) => e.src_kind === 'embed').map((e) => e.src), fwdAdj);
    const bwd = reach(sel.filter((e) => e.dst_kind === 'final').map((e) => e.dst), bwdAdj);
    return sel.filter((e) => fwd.has(e.src) && bwd.has(e.dst));
  }

  /** Node coordinates: x by layer (input, then attention and MLP of each layer, then logits),
   *  y by head (MLP above the heads); positional: one band per position. */
  function layout(node, data) {
    const H = data.n_heads;
    const kind = node.kind || node.src_kind;
    let x;
    if (kind === 'embed') x = 0;
    else if (kind === 'final') x = 2 * data.n_layers + 1;
    else x = 2 * node.layer + (kind === 'mlp' ? 2 : 1);
    let y;
    if (kind === 'attn' && node.head !== null && node.head !== undefined) y = node.head;
    else if (kind === 'mlp') y = H + 0.5;
    else y = (H - 1) / 2;
    if (data.positional) {
      if (node.site && node.site !== 'q') x += 0.35;
      const band = H + 2;
      y = (node.position === null || node.position === undefined ? -1 : node.position) * band + y;
    }
    return [x, y];
  }

  function axes(data, nodes) {
    const xs = [0];
    const xt = ['input'];
    for (let l = 0; l < data.n_layers; l++) { xs.push(2 * l + 1, 2 * l + 2); xt.push(`a${l}`, `m${l}`); }
    xs.push(2 * data.n_layers + 1); xt.push('logits');
    const yaxis = { zeroline: false, showgrid: false, autorange: 'reversed' };
    if (data.positional) {
      const positions = [...new Set(nodes.map((n) => n.position).filter((p) => p !== null && p !== undefined))].sort((a, b) => a - b);
      const band = data.n_heads + 2;
      const labels = data.position_labels || {};
      yaxis.tickvals = positions.map((p) => p * band + data.n_heads / 2);
      yaxis.ticktext = positions.map((p) => labels[p] || `pos ${p}`);
    } else {
      yaxis.tickvals = [...Array(data.n_heads).keys(), data.n_heads + 0.5];
      yaxis.ticktext = [...Array(data.n_heads).keys()].map((h) => `h${h}`).concat(['mlp']);
    }
    return { xaxis: { tickvals: xs, ticktext: xt, zeroline: false, showgrid: true, gridcolor: '#f0f0f0' }, yaxis };
  }

  function scoreLines(r) {
    return `score ${fmt(r.score)}<br>|score| sum ${fmt(r.abs_score)}<br>positive ${fmt(r.pos_score)} · negative ${fmt(r.neg_score)}<br>paths ${fmt(r.n_paths)}`;
  }

  /** Node scores of a circuit answer, fetched after the first paint (a Map node -> row). */
  async function nodeStats(sign, positional) {
    const key = `nodes/${sign}/${positional}`;
    if (!state.cache[key]) {
      state.cache[key] = (EXPORT
        ? Promise.resolve({ nodes: EXPORT.node_stats[sign] })
        : api(runUrl(state.run, 'nodes', { sign, positional: positional ? 1 : 0 })))
        .then((body) => new Map(body.nodes.map((n) => [n.node, n])));
    }
    try {
      return await state.cache[key];
    } catch (e) {
      delete state.cache[key];
      throw e;
    }
  }

  /** Draw a circuit answer into the elements `ids` names (plot, status line, edge table: none in
   *  the compare view, which has no click-through). */
  function drawCircuit(data, stats, ids) {
    ids = ids || { plot: 'circuit-plot', status: 'circuit-status', list: 'edge-list' };
    const k = Math.min(state.k, data.edges.length);  // the slider asks for k; fewer when the run has fewer
    const sel = selectEdges(data, k, state.prune);
    const names = new Set();
    for (const e of sel) { names.add(e.src); names.add(e.dst); }
    const nodes = data.nodes.filter((n) => names.has(n.node));
    const gd = document.getElementById(ids.plot);
    const status = `${sel.length} edges · ${nodes.length} nodes drawn (top ${k} of ${fmt(data.total_edges)} edges${state.prune ? ', pruned to input → logits chains' : ''})`;
    gd.dataset.edges = String(sel.length);
    gd.dataset.nodes = String(nodes.length);
    gd.dataset.view = `${state.sign} ${k}`;
    if (!sel.length) {
      Plotly.purge(gd);
      document.getElementById(ids.status).textContent = `${status}: no input → logits chain yet; raise the edge count or untick prune`;
      if (ids.list) document.getElementById(ids.list).replaceChildren();
      return;
    }
    const where = new Map(nodes.map((n) => [n.node, layout(n, data)]));
    const maxAbs = Math.max(1e-12, ...sel.map((e) => Math.abs(e.score)));
    const traces = sel.map((e) => {
      const [x0, y0] = where.get(e.src);
      const [x1, y1] = where.get(e.dst);
      return {
        type: 'scatter', mode: 'lines', x: [x0, x1], y: [y0, y1], hoverinfo: 'skip', showlegend: false, opacity: 0.7,
        line: { color: e.score >= 0 ? POS : NEG, width: 0.8 + 7 * Math.abs(e.score) / maxAbs },
      };
    });
    const mid = (e, i) => (where.get(e.src)[i] + where.get(e.dst)[i]) / 2;
    traces.push({
      type: 'scatter', mode: 'markers', name: 'edges', showlegend: false,
      x: sel.map((e) => mid(e, 0)), y: sel.map((e) => mid(e, 1)), customdata: sel.map((e) => e.edge),
      text: sel.map((e) => `<b>${e.edge}</b><br>${scoreLines(e)}${ids.list ? '<br><i>click: top paths</i>' : ''}`),
      hovertemplate: '%{text}<extra></extra>',
      marker: { symbol: 'diamond', size: 9, color: sel.map((e) => (e.score >= 0 ? POS : NEG)), line: { width: 1, color: '#fff' } },
    });
    traces.push({
      type: 'scatter', mode: 'markers+text', name: 'nodes', showlegend: false,
      x: nodes.map((n) => where.get(n.node)[0]), y: nodes.map((n) => where.get(n.node)[1]),
      customdata: nodes.map((n) => n.node), textposition: 'top center', cliponaxis: false,
      text: nodes.map((n) => n.node), textfont: { size: 10 },
      hovertext: nodes.map((n) => {
        const stat = stats && stats.get(n.node);
        return `<b>${n.node}</b><br>${stat ? scoreLines(stat) : 'scores loading…'}${ids.list ? '<br><i>click: top paths through it</i>' : ''}`;
      }),
      hovertemplate: '%{hovertext}<extra></extra>',
      marker: { size: 14, color: nodes.map((n) => KIND_COLOUR[n.kind] || '#ccc'), line: { width: 1, color: '#555' } },
    });
    const layoutSpec = Object.assign({ margin: { l: 70, r: 20, t: 20, b: 40 }, hovermode: 'closest', plot_bgcolor: '#fff', dragmode: 'pan' }, axes(data, nodes));
    Plotly.react(gd, traces, layoutSpec, { displaylogo: false, responsive: true, scrollZoom: true });
    document.getElementById(ids.status).textContent = status;
    if (!ids.list) return;
    gd.removeAllListeners && gd.removeAllListeners('plotly_click');
    gd.on('plotly_click', (ev) => {
      const pt = ev.points && ev.points[0];
      if (!pt) return;
      if (pt.curveNumber === sel.length) showPaths({ edge: pt.customdata });
      else if (pt.curveNumber === sel.length + 1) showPaths({ through: pt.customdata });
    });
    const edgeTable = table(
      [{ key: 'edge' }, { key: 'score' }, { key: 'abs_score' }, { key: 'pos_score' }, { key: 'neg_score' }, { key: 'n_paths' }],
      sel, (e) => ({ className: 'edge-row clickable', 'data-edge': e.edge, onclick: () => showPaths({ edge: e.edge }) }));
    edgeTable.id = 'edge-table';
    document.getElementById('edge-list').replaceChildren(edgeTable);
  }

  async function showPaths(target) {
    const panel = document.getElementById('paths-panel');
    const what = target.edge ? 'edge' : 'through';
    const spec = target.edge || target.through;
    const order = { both: 'abs', positive: 'positive', negative: 'negative' }[state.sign];
    const cli = `pathdb query paths ${state.run} --${what === 'edge' ? 'edge' : 'through'} '${spec}'${order === 'abs' ? '' : ' --order ' + order}`;
    for (const row of document.querySelectorAll('tr.edge-row')) row.classList.toggle('selected', row.dataset.edge === target.edge);
    panel.replaceChildren(el('h3', { id: 'paths-title' }, `top paths ${what === 'edge' ? 'using' : 'through'} ${spec}`),
      el('p', {}, el('span', { className: 'cli' }, cli)), el('p', { className: 'muted' }, 'loading…'));
    let rows;
    try {
      if (EXPORT) {
        const stored = (EXPORT.paths[state.sign] || {})[`${what}:${spec}`];
        if (!stored) throw new Error(`this file holds the top paths of the ${EXPORT.paths_edges} strongest edges (both signs) and their nodes only; run: ${cli}`);
        rows = stored;
      } else {
        const params = { k: 20, order };
        params[what] = spec;
        rows = (await api(runUrl(state.run, 'paths', params))).paths;
      }
    } catch (e) {
      panel.lastChild.textContent = e.message;
      return;
    }
    const list = table(
      [{ key: 'path_id' }, { key: 'contribution' }, { key: 'method' }, { key: 'prompt_idx', title: 'prompt' },
        { key: 'path', className: 'path-label' }],
      rows, () => ({ className: 'path-row' }));
    list.id = 'paths-list';
    panel.lastChild.replaceWith(rows.length ? list : el('p', { className: 'muted' }, 'no complete paths'));
  }

  async function showCircuit() {
    const main = document.getElementById('main');
    const radio = (value) => el('label', {},
      el('input', { type: 'radio', name: 'sign', value, checked: state.sign === value, onchange: () => { state.sign = value; render(); } }),
      ` ${value}`);
    main.replaceChildren(
      el('div', { className: 'controls' },
        el('label', {}, 'edges ', el('input', { id: 'edge-slider', type: 'range', min: 1, max: 1, value: 1 }),
          ' ', el('span', { id: 'edge-count' }, '')),
        el('span', { id: 'sign-toggle' }, radio('both'), ' ', radio('positive'), ' ', radio('negative')),
        el('label', {}, el('input', { id: 'prune', type: 'checkbox', checked: state.prune, onchange: (e) => { state.prune = e.target.checked; render(); } }), ' prune'),
        EXPORT ? null : el('label', {}, el('input', { id: 'positional', type: 'checkbox', checked: state.positional, onchange: (e) => { state.positional = e.target.checked; render(); } }), ' positional'),
        EXPORT ? null : el('button', { id: 'refresh', onclick: () => { state.cache = {}; render(); } }, 'refresh'),
        el('span', { id: 'run-status', className: 'muted' })),
      el('div', { id: 'circuit-status', className: 'muted' }, 'loading…'),
      el('div', { className: 'layout' },
        el('div', { id: 'circuit-plot' }),
        el('div', { id: 'paths-panel' }, el('p', { className: 'muted' }, 'click an edge (◆) or a node to list the top paths through it'))),
      el('div', { id: 'edge-list', className: 'scroll' }));
    const slider = document.getElementById('edge-slider');
    let pending = null;
    slider.addEventListener('input', () => {
      state.k = Number(slider.value);
      document.getElementById('edge-count').textContent = slider.value;
      if (pending) cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => { pending = null; render(); });
    });

    async function render() {
      stopTimer();
      let data;
      try {
        data = await edgeData(state.sign, state.positional);
      } catch (e) {
        document.getElementById('circuit-status').textContent = '';
        showError(e.message);
        return;
      }
      showError('');
      const run = data.run || {};
      const k = Math.max(1, Math.min(state.k, data.edges.length));
      slider.max = String(Math.max(1, data.edges.length));
      slider.value = String(k);
      document.getElementById('edge-count').textContent = String(k);
      const live = run.status === 'running';
      document.getElementById('run-status').textContent = `status ${run.status || '?'}${live ? ' (search running: refreshing every 5 s)' : ''}`;
      if (!data.edges.length) {
        document.getElementById('circuit-status').textContent = 'no edges: this run has no complete kept paths with this sign';
        Plotly.purge(document.getElementById('circuit-plot'));
        return;
      }
      const view = `${state.sign}/${state.positional}`;
      drawCircuit(data, null);
      nodeStats(state.sign, state.positional).then((stats) => {
        if (view === `${state.sign}/${state.positional}`) drawCircuit(data, stats);
      }, (e) => showError(e.message));
      if (live && !EXPORT) state.timer = setTimeout(() => { state.cache = {}; render(); }, REFRESH_MS);
    }
    await render();
  }

  // ---- two runs side by side ----------------------------------------------------------------
  /** Two runs' circuits with one slider / sign toggle / prune box, the `pathdb compare` numbers
   *  (CPR, CMD, edges for 80 / 90 %, top-k Jaccard, Spearman) and both runs' faithfulness curves. */
  async function showCompare(a, b) {
    const main = document.getElementById('main');
    const radio = (value) => el('label', {},
      el('input', { type: 'radio', name: 'compare-sign', value, checked: state.sign === value, onchange: () => { state.sign = value; render(); } }),
      ` ${value}`);
    const side = (id, run) => el('div', { className: 'compare-side' },
      el('h3', {}, el('a', { href: `#/run/${encodeURIComponent(run)}/circuit` }, `run ${run}`)),
      el('div', { id: `compare-status-${id}`, className: 'muted' }, 'loading…'),
      el('div', { id: `compare-plot-${id}`, className: 'compare-plot' }));
    main.replaceChildren(
      el('div', { className: 'controls' },
        el('label', {}, 'edges ', el('input', { id: 'compare-slider', type: 'range', min: 1, max: 1, value: 1 }),
          ' ', el('span', { id: 'compare-count' }, '')),
        el('span', { id: 'compare-sign' }, radio('both'), ' ', radio('positive'), ' ', radio('negative')),
        el('label', {}, el('input', { type: 'checkbox', checked: state.prune, onchange: (e) => { state.prune = e.target.checked; render(); } }), ' prune'),
        el('label', {}, 'Jaccard over the top ', el('input', { id: 'compare-k', type: 'number', min: 1, value: 50, onchange: () => numbers() }), ' edges')),
      el('div', { className: 'compare-layout' }, side('a', a), side('b', b)),
      el('div', { id: 'compare-numbers' }, el('p', { className: 'muted' }, 'computing the pathdb compare numbers…')),
      el('div', { id: 'compare-curves', className: 'plot', hidden: true }));
    const slider = document.getElementById('compare-slider');
    let pending = null;
    slider.addEventListener('input', () => {
      state.k = Number(slider.value);
      document.getElementById('compare-count').textContent = slider.value;
      if (pending) cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => { pending = null; render(); });
    });

    async function render() {
      let both;
      try {
        both = await Promise.all([edgeData(state.sign, false, a), edgeData(state.sign, false, b)]);
      } catch (e) {
        showError(e.message);
        return;
      }
      showError('');
      const most = Math.max(1, ...both.map((d) => d.edges.length));
      const k = Math.max(1, Math.min(state.k, most));
      slider.max = String(most);
      slider.value = String(k);
      document.getElementById('compare-count').textContent = String(k);
      both.forEach((data, i) => {
        const id = i ? 'b' : 'a';
        if (!data.edges.length) {
          const gd = document.getElementById(`compare-plot-${id}`);
          document.getElementById(`compare-status-${id}`).textContent = 'no edges: this run has no complete kept paths with this sign';
          Plotly.purge(gd);
          Object.assign(gd.dataset, { edges: '0', nodes: '0', view: `${state.sign} 0` });
        } else drawCircuit(data, null, { plot: `compare-plot-${id}`, status: `compare-status-${id}`, list: null });
      });
    }

    async function numbers() {
      const k = document.getElementById('compare-k').value || 50;
      const box = document.getElementById('compare-numbers');
      let body;
      try {
        body = await api(`api/compare?${new URLSearchParams({ a, b, k })}`);
      } catch (e) {
        box.replaceChildren(el('p', { className: 'muted' }, e.message));
        return;
      }
      const rows = body.runs.map((r) => Object.assign({ run: r.run.name, method: r.run.method, strategy: r.run.strategy, search_s: r.run.wall_s }, r.summary || {}));
      const columns = ['run', 'method', 'strategy', 'cpr', 'cmd', 'edges_80', 'edges_90', 'search_s', 'eval_s', 'eval_prompts', 'intervention'].map((key) => ({ key }));
      const numbersTable = table(columns, rows, (r) => ({ className: 'compare-row', 'data-run': r.run }));
      numbersTable.id = 'compare-table';
      const missing = body.runs.filter((r) => !r.evaluation).map((r) => r.run.name);
      box.replaceChildren(...[
        el('p', { id: 'compare-agreement', 'data-jaccard': body.jaccard, 'data-spearman': body.spearman },
          `top-${body.top_k} edge overlap (Jaccard) ${fmt(body.jaccard)} · edge-score rank correlation (Spearman) ${fmt(body.spearman)} `,
          el('span', { className: 'cli' }, `pathdb compare ${a} ${b} --top-k ${body.top_k}`)),
        numbersTable,
        missing.length ? el('p', { className: 'muted' }, `no stored evaluation for ${missing.join(', ')}: run `, el('span', { className: 'cli' }, `pathdb evaluate ${missing.join(' ')}`)) : null,
        body.warning ? el('p', { className: 'muted' }, `warning: ${body.warning}`) : null].filter(Boolean));
      const traces = [];
      body.runs.forEach((r, i) => {
        if (!r.evaluation) return;
        for (const [name, points] of Object.entries(r.evaluation.curves)) {
          traces.push({
            type: 'scatter', mode: 'lines+markers', name: `${r.run.name}: ${name}`, line: { dash: i ? 'dash' : 'solid' },
            x: points.map((p) => p.n_edges), y: points.map((p) => p.faithfulness),
            hovertemplate: `${r.run.name} ${name}: %{x} edges, faithfulness %{y:.3f}<extra></extra>`,
          });
        }
      });
      const curves = document.getElementById('compare-curves');
      curves.hidden = !traces.length;
      if (!traces.length) return;
      Plotly.react(curves, traces, {
        margin: { l: 60, r: 20, t: 20, b: 50 }, xaxis: { title: { text: 'circuit edges' }, type: 'log' },
        yaxis: { title: { text: 'faithfulness' } }, shapes: [{ type: 'line', xref: 'paper', x0: 0, x1: 1, y0: 1, y1: 1, line: { dash: 'dot', color: '#999' } }],
      }, { displaylogo: false, responsive: true });
    }
    await Promise.all([render(), numbers()]);
  }

  // ---- path tree ----------------------------------------------------------------------------
  async function showTree() {
    const main = document.getElementById('main');
    main.replaceChildren(el('p', { className: 'muted' },
      'The search as it happened: every evaluated extension of a path, strongest first. ▸ expands one level.'),
    el('ul', { className: 'tree', id: 'tree' }));
    try {
      const level = await api(runUrl(state.run, 'tree'));
      document.getElementById('tree').replaceChildren(...level.children.map((r) => treeNode(r, [])));
    } catch (e) {
      showError(e.message);
    }
  }

  function treeNode(row, chain) {
    const path = [row.label, ...chain];
    const score = row.contribution;
    const expand = el('button', { className: 'expand', title: row.n_children ? `${row.n_children} extensions` : 'no extensions' }, row.n_children ? '▸' : '·');
    const li = el('li', { className: 'tree-node', 'data-path-id': row.path_id, 'data-children': row.n_children },
      el('div', { className: 'tree-row', title: path.join(' -> ') },
        expand,
        el('span', { className: 'label' }, row.label),
        ' ',
        el('span', { className: score === null ? 'score' : (score >= 0 ? 'score pos' : 'score neg') }, score === null ? '(root)' : fmt(score)),
        el('span', { className: 'method' }, row.method),
        el('span', { className: `flag ${row.kept ? 'kept' : 'pruned'}` }, row.kept ? 'kept' : 'pruned'),
        row.complete ? el('span', { className: 'flag complete' }, 'complete') : null,
        row.prompt_idx !== null ? el('span', { className: 'method' }, `prompt ${row.prompt_idx}`) : null,
        el('span', { className: 'nchildren' }, row.n_children ? `${fmt(row.n_children)} ext.` : '')));
    let open = false;
    let children = null;
    expand.addEventListener('click', async () => {
      if (!row.n_children) return;
      open = !open;
      expand.textContent = open ? '▾' : '▸';
      if (children) { children.hidden = !open; return; }
      children = el('ul', { className: 'children' }, el('li', { className: 'muted' }, 'loading…'));
      li.append(children);
      try {
        const level = await api(runUrl(state.run, 'tree', { parent: row.path_id }));
        const items = level.children.map((r) => treeNode(r, path));
        if (level.total > level.children.length) {
          items.push(el('li', { className: 'more' }, `… ${fmt(level.total - level.children.length)} weaker extensions not shown (query them with pathdb sql)`));
        }
        children.replaceChildren(...items);
      } catch (e) {
        children.replaceChildren(el('li', { className: 'more' }, e.message));
      }
    });
    return li;
  }

  // ---- cross-prompt -------------------------------------------------------------------------
  async function showPrompts() {
    const main = document.getElementById('main');
    main.replaceChildren(el('div', { id: 'heatmap', className: 'plot' }), el('div', { id: 'prompt-stats', className: 'scroll' }));
    let body;
    try {
      body = await api(runUrl(state.run, 'crossprompt', { top: 30 }));
    } catch (e) {
      main.replaceChildren(el('p', { className: 'muted' }, e.message));
      return;
    }
    main.prepend(el('p', { id: 'heatmap-caption', className: 'muted' },
      `The ${body.edges.length} edges with the largest |mean| over ${fmt(body.n_prompts)} prompts; cells: the edge's score on each prompt` +
      (body.prompts.length < body.n_prompts ? ` (first ${body.prompts.length} prompts shown)` : '') +
      '. Sign consistency: share of a prompt\'s appearances with the majority sign.'));
    const labels = body.prompts.map((p) => `p${p.prompt_idx}`);
    const edges = body.edges.map((e) => e.edge);
    const zmax = Math.max(1e-12, ...body.matrix.flat().map(Math.abs));
    Plotly.react('heatmap', [{
      type: 'heatmap', z: body.matrix, x: labels, y: edges, zmid: 0, zmin: -zmax, zmax,
      colorscale: [[0, NEG], [0.5, '#ffffff'], [1, POS]],
      text: edges.map(() => body.prompts.map((p) => p.clean || '')),
      hovertemplate: '%{y}<br>%{x}: %{z:.4g}<br>%{text}<extra></extra>',
    }], { margin: { l: 220, r: 20, t: 20, b: 60 }, height: Math.max(420, 18 * edges.length + 100), yaxis: { autorange: 'reversed' } },
    { displaylogo: false, responsive: true });
    const stats = table(['edge', 'mean', 'std', 'min', 'max', 'frequency', 'sign_consistency', 'n_present'].map((key) => ({ key })), body.edges);
    stats.id = 'crossprompt-table';
    document.getElementById('prompt-stats').replaceChildren(stats);
  }

  // ---- faithfulness -------------------------------------------------------------------------
  async function showFaithfulness() {
    const main = document.getElementById('main');
    let body;
    try {
      body = await api(runUrl(state.run, 'faithfulness'));
    } catch (e) {
      showError(e.message);
      return;
    }
    const ev = body.evaluation;
    if (!ev) {
      main.replaceChildren(el('p', { className: 'muted', id: 'no-evaluation' },
        `run ${body.run} has no stored evaluation: run `, el('span', { className: 'cli' }, `pathdb evaluate ${body.run}`), ' and refresh'));
      return;
    }
    main.replaceChildren(
      el('p', { id: 'faithfulness-summary' },
        `CPR ${fmt(ev.cpr)} · CMD ${fmt(ev.cmd)} · edges for 80 %: ${fmt(ev.edges_80)} · for 90 %: ${fmt(ev.edges_90)} `,
        el('span', { className: 'muted' }, `(${ev.intervention}, ${ev.metric}, score ${ev.score}, ${ev.prompts}${ev.heldout ? ', held out' : ''})`)),
      el('div', { id: 'faithfulness-plot', className: 'plot' }));
    const traces = Object.entries(ev.curves).map(([name, points]) => ({
      type: 'scatter', mode: 'lines+markers', name,
      x: points.map((p) => p.n_edges), y: points.map((p) => p.faithfulness),
      hovertemplate: `${name}: %{x} edges, faithfulness %{y:.3f}<extra></extra>`,
    }));
    Plotly.react('faithfulness-plot', traces, {
      margin: { l: 60, r: 20, t: 20, b: 50 }, xaxis: { title: { text: 'circuit edges' }, type: 'log' },
      yaxis: { title: { text: 'faithfulness' } }, shapes: [{ type: 'line', xref: 'paper', x0: 0, x1: 1, y0: 1, y1: 1, line: { dash: 'dot', color: '#999' } }],
    }, { displaylogo: false, responsive: true });
  }

  window.addEventListener('hashchange', route);
  window.addEventListener('DOMContentLoaded', route);
})();
