// Ranges and bucket sizes, in the visitor's chosen time zone.

const HOUR = 3600e3;
const DAY = 24 * HOUR;

const wallFormat = new Map();

/** The wall-clock fields of `date` in `tz`. */
export function wall(date, tz) {
  let f = wallFormat.get(tz);
  if (!f) {
    f = new Intl.DateTimeFormat('en-US', {
      timeZone: tz, hourCycle: 'h23', year: 'numeric', month: 'numeric', day: 'numeric',
      hour: 'numeric', minute: 'numeric', second: 'numeric',
    });
    wallFormat.set(tz, f);
  }
  const p = Object.fromEntries(f.formatToParts(date).map((x) => [x.type, x.value]));
  return { y: +p.year, mo: +p.month, d: +p.day, h: +p.hour % 24, mi: +p.minute, s: +p.second };
}

function offset(ms, tz) {
  const w = wall(new Date(ms), tz);
  return Date.UTC(w.y, w.mo - 1, w.d, w.h, w.mi, w.s) - Math.floor(ms / 1000) * 1000;
}

/** The instant whose wall clock in `tz` reads these fields (the later one in a repeated hour). */
export function zoned(y, mo, d, h, mi, tz) {
  const guess = Date.UTC(y, mo - 1, d, h, mi);
  const first = guess - offset(guess, tz);
  return new Date(guess - offset(first, tz));
}

/** True when `tz` is a time zone this browser knows. */
export function validZone(tz) {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: tz });
    return true;
  } catch {
    return false;
  }
}

/** The browser's own zone. */
export function browserZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
}

function floor(date, g, tz) {
  const w = wall(date, tz);
  if (g === 'minute') return new Date(Math.floor(date.getTime() / 60e3) * 60e3);
  if (g === 'hour') return zoned(w.y, w.mo, w.d, w.h, 0, tz);
  if (g === 'day') return zoned(w.y, w.mo, w.d, 0, 0, tz);
  return zoned(w.y, w.mo, 1, 0, 0, tz);
}

/** The bucket size that gives a readable chart for a span of `ms`. */
export function granularityFor(ms) {
  if (ms <= 3 * HOUR) return 'minute';
  if (ms <= 8 * DAY) return 'hour';
  if (ms <= 190 * DAY) return 'day';
  return 'month';
}

/** `datetime-local` text ("2026-12-02T10:00") read in `tz`. */
export function parseLocal(text, tz) {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(text || '');
  if (!m) return null;
  return zoned(+m[1], +m[2], +m[3], +m[4], +m[5], tz);
}

/** `date` as `datetime-local` text in `tz`. */
export function formatLocal(date, tz) {
  const w = wall(date, tz);
  const p = (n) => String(n).padStart(2, '0');
  return `${w.y}-${p(w.mo)}-${p(w.d)}T${p(w.h)}:${p(w.mi)}`;
}

/**
 * The range a view shows: `{from, to, granularity, label}` (Dates). Quick
 * ranges start on a bucket boundary, so the totals are exactly the buckets
 * drawn (the last one still filling).
 */
export function resolveRange(state, now = new Date()) {
  const tz = state.tz;
  switch (state.range) {
    case '1h':
      return { from: new Date(floor(now, 'minute', tz).getTime() - 59 * 60e3), to: now, granularity: 'minute', label: 'last hour' };
    case '7d':
      return { from: floor(new Date(now.getTime() - 167 * HOUR), 'hour', tz), to: now, granularity: 'hour', label: 'last 7 days' };
    case '30d': {
      const w = wall(now, tz);
      return { from: zoned(w.y, w.mo, w.d - 29, 0, 0, tz), to: now, granularity: 'day', label: 'last 30 days' };
    }
    case 'month':
      return { from: floor(now, 'month', tz), to: now, granularity: 'day', label: 'this month' };
    case 'custom': {
      const from = parseLocal(state.from, tz);
      const to = parseLocal(state.to, tz);
      if (from && to && from < to) {
        return { from, to, granularity: granularityFor(to - from), label: 'custom range' };
      }
      return { error: 'Choose a custom range whose start is before its end.' };
    }
    case '24h':
    default:
      return { from: floor(new Date(now.getTime() - 23 * HOUR), 'hour', tz), to: now, granularity: 'hour', label: 'last 24 hours' };
  }
}
