// How figures read on the page: percentages, token counts, milliseconds, clock times.

export function pct(value) {
  return value === null || value === undefined ? "—" : `${(value * 100).toFixed(1)}%`;
}

export function count(value) {
  return value === null || value === undefined ? "—" : Number(value).toLocaleString("en-US");
}

export function tokens(value) {
  if (value === null || value === undefined) return "—";
  const v = Number(value);
  if (Math.abs(v) >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (Math.abs(v) >= 1e4) return `${(v / 1e3).toFixed(1)}k`;
  return v.toLocaleString("en-US");
}

export function ms(value) {
  if (value === null || value === undefined) return "—";
  const v = Number(value);
  if (v >= 1000) return `${(v / 1000).toFixed(2)} s`;
  return `${v >= 100 ? Math.round(v) : v.toFixed(1)} ms`;
}

/** Seconds since the epoch -> local wall-clock time, 24 h. */
export function clock(tsS, withDate = false) {
  const d = new Date(tsS * 1000);
  const time = d.toLocaleTimeString("en-GB", { hour12: false });
  return withDate ? `${d.toLocaleDateString("en-GB")} ${time}` : time;
}

/** A prompt's text on one line, chat-template markers dimmed to a middle dot. */
export function oneLine(text) {
  return String(text || "")
    .replace(/<\|[^|>]{1,40}\|>|<\/?s>|\[\/?INST\]/g, " · ")
    .replace(/\s+/g, " ")
    .replace(/^[\s·]+/, "")
    .trim();
}

export function shorten(text, maxChars) {
  if (maxChars <= 1) return "";
  return text.length <= maxChars ? text : `${text.slice(0, maxChars - 1)}…`;
}
