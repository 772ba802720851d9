// Number and time rendering. Costs arrive as exact decimal strings
// ("12.345000000") and are rendered from the string, never through a float.

const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const parts = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1 }).formatToParts(1.5);
const DECIMAL = (parts.find((p) => p.type === 'decimal') || { value: '.' }).value;

/** An integer with thousands separators; '–' for null. */
export function int(n) {
  if (n === null || n === undefined) return '–';
  return nf.format(n);
}

/**
 * An exact decimal string with thousands separators, trailing zeros trimmed
 * to at least `minFraction` digits: "1234.560000000" → "1,234.56".
 */
export function cost(s, minFraction = 2) {
  if (s === null || s === undefined) return '–';
  const neg = s.startsWith('-');
  const [whole, frac = ''] = (neg ? s.slice(1) : s).split('.');
  let f = frac.replace(/0+$/, '');
  if (f.length < minFraction) f = f.padEnd(minFraction, '0');
  const w = nf.format(BigInt(whole || '0'));
  return `${neg ? '-' : ''}${w}${f ? DECIMAL + f : ''}`;
}

/** A ratio as a percentage with two decimals; '–' for null. */
export function pct(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return '–';
  return `${(x * 100).toFixed(2)} %`;
}

/** `num / den` or null when `den` is 0. */
export function ratio(num, den) {
  return den ? num / den : null;
}

/** Milliseconds with one decimal and the unit. */
export function ms(x) {
  if (x === null || x === undefined) return '–';
  return `${new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 }).format(x)} ms`;
}

/** An instant in `tz`: "2026-12-02 22:15:08". */
export function instant(iso, tz) {
  if (!iso) return '–';
  const d = new Date(iso);
  const f = new Intl.DateTimeFormat('sv-SE', {
    timeZone: tz, year: 'numeric', month: '2-digit', day: '2-digit',
    hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
  });
  return f.format(d);
}

/** How long ago `iso` was, coarsely: "12 s ago", "3 min ago". */
export function ago(iso, now = Date.now()) {
  if (!iso) return 'never';
  const s = Math.max(0, Math.round((now - new Date(iso).getTime()) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** A group object as "api=openai, key=k1". */
export function group(g) {
  const entries = Object.entries(g || {});
  return entries.length ? entries.map(([k, v]) => `${k}=${v === '' ? '(none)' : v}`).join(', ') : '(all)';
}
