// Small DOM helpers: element creation, sections with loading/empty/error
// states, and sortable tables that update in place.

/** `h('td', {class: 'num'}, 'text', child)`: an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A titled section whose body shows loading, empty, error or content. */
export class Section {
  constructor(parent, title, id) {
    this.el = h('section', { class: 'card', id, 'aria-labelledby': `${id}-title` });
    this.head = h('div', { class: 'card-head' }, h('h2', { id: `${id}-title` }, title));
    this.status = h('p', { class: 'state', 'data-state': 'loading' }, 'Loading…');
    this.body = h('div', { class: 'card-body' });
    this.el.append(this.head, this.status, this.body);
    parent.append(this.el);
    this.last = null;
  }

  /** Shows `message` as this section's error (the content stays hidden). */
  error(err) {
    this.status.hidden = false;
    this.status.dataset.state = 'error';
    this.status.className = 'state error';
    this.status.textContent = err.code ? `${err.message} (${err.code})` : err.message;
    this.body.hidden = true;
    this.last = null;
  }

  /** Shows `message` instead of content. */
  empty(message) {
    this.status.hidden = false;
    this.status.dataset.state = 'empty';
    this.status.className = 'state';
    this.status.textContent = message;
    this.body.hidden = true;
    this.last = null;
  }

  /**
   * Calls `render(data)` unless `data` is what was shown last (so a refresh
   * that changes nothing touches no DOM: scroll, focus and selection stay).
   */
  show(data, render) {
    const json = JSON.stringify(data);
    this.status.hidden = true;
    this.status.dataset.state = 'ready';
    this.body.hidden = false;
    if (json === this.last) return;
    this.last = json;
    render(data);
  }
}

/**
 * A sortable table. `columns`: `{id, label, value(row), text(row), num}`
 * (`cell(row)`: a node instead of text; `raw(row)`: `data-value` when the
 * sort value is not the exact one, as for costs);
 * clicking a header sorts by it (again: reverses) and calls `onSort`.
 */
export class SortTable {
  constructor(parent, { caption, columns, sort, onSort, rowKey }) {
    this.columns = columns;
    this.sort = sort || { id: columns[1].id, desc: true };
    this.onSort = onSort;
    this.rowKey = rowKey;
    this.rows = [];
    this.table = h('table', { class: 'data' });
    if (caption) this.table.append(h('caption', { class: 'sr-only' }, caption));
    const tr = h('tr');
    this.heads = columns.map((c) => {
      const btn = h('button', { type: 'button', onclick: () => this.toggle(c.id) }, c.label);
      const th = h('th', { scope: 'col', class: c.num ? 'num' : null, 'data-col': c.id }, btn);
      tr.append(th);
      return th;
    });
    this.tbody = h('tbody');
    this.table.append(h('thead', {}, tr), this.tbody);
    this.wrap = h('div', { class: 'table-wrap' }, this.table);
    parent.append(this.wrap);
  }

  toggle(id) {
    this.sort = this.sort.id === id ? { id, desc: !this.sort.desc } : { id, desc: true };
    if (this.onSort) this.onSort(this.sort);
    this.render();
  }

  update(rows) {
    this.rows = rows;
    this.render();
  }

  render() {
    const col = this.columns.find((c) => c.id === this.sort.id) || this.columns[0];
    const sorted = [...this.rows].sort((a, b) => {
      const x = col.value(a);
      const y = col.value(b);
      let c;
      if (typeof x === 'bigint' || typeof y === 'bigint') c = x < y ? -1 : x > y ? 1 : 0;
      else if (typeof x === 'number' && typeof y === 'number') c = x - y;
      else if (x === null || x === undefined) c = -1;
      else if (y === null || y === undefined) c = 1;
      else c = String(x).localeCompare(String(y));
      return this.sort.desc ? -c : c;
    });
    this.heads.forEach((th, i) => {
      const id = this.columns[i].id;
      th.setAttribute('aria-sort', id === col.id ? (this.sort.desc ? 'descending' : 'ascending') : 'none');
    });
    this.tbody.replaceChildren(...sorted.map((row) => {
      const tr = h('tr', { 'data-row': this.rowKey ? this.rowKey(row) : null });
      for (const c of this.columns) {
        const content = c.cell ? c.cell(row) : c.text(row);
        const raw = c.raw ? c.raw(row) : c.value(row);
        tr.append(h(c.header ? 'th' : 'td', {
          class: c.num ? 'num' : null,
          scope: c.header ? 'row' : null,
          'data-col': c.id,
          'data-value': raw === null || raw === undefined ? '' : String(raw),
        }, content));
      }
      return tr;
    }));
  }
}
